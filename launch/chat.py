"""Talk to a model: a trained run's folder, any local model folder, or a GGUF file, with its own chat template.

    python launch/chat.py runs/adalomo                      # multi-turn; /reset forgets the conversation, /exit quits
    python launch/chat.py runs/adalomo --prompt "What is two plus three?"          # one answer, then exit
    python launch/chat.py "$(python launch/import_gguf.py --packaged)" --system "Answer in one word."

The reply streams as it is generated; greedy by default (--temperature 0), sampling with --temperature > 0 and
--top_p. The first line says which chat template is used (the model folder's, the GGUF file's, or --chat_template's);
a model without one is refused (pass --chat_template FILE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimizer_recipes.core.models import gguf_source  # noqa: E402
from optimizer_recipes.core.run.config import ConfigError  # noqa: E402


def load(source: str):
    """(model, tokenizer, where the chat template comes from) for a folder or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_source.is_gguf(source):
        gguf_source.check_file("launch/chat.py", source)
        return gguf_source.load_model(source, torch.float32), gguf_source.load_tokenizer(source), "the GGUF file's"
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{source}: not a model folder (no config.json) or .gguf file; give a run's output_dir, a "
                          "folder written by save_pretrained, or a GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model, tokenizer, f"{path / 'chat_template.jinja'}" if (path / "chat_template.jinja").is_file() else \
        "the tokenizer's"


class Chat:
    def __init__(self, model, tokenizer, system: str | None, max_new_tokens: int, temperature: float, top_p: float):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system, self.max_new_tokens, self.temperature, self.top_p = system, max_new_tokens, temperature, top_p
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, stream=True) -> str:
        import torch
        from transformers import TextStreamer

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt").to(self.model.device)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        room = positions - inputs["input_ids"].shape[1]  # new tokens the model has positions for
        if room <= 0:
            self.messages.pop()
            answer = (f"(the conversation has {inputs['input_ids'].shape[1]} tokens, the model {positions} positions: "
                      "/reset to start over)")
            print(answer)
            return answer
        sampling = self.temperature > 0
        options = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if sampling else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=min(self.max_new_tokens, room), streamer=streamer,
                                         pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                         **options)
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's output_dir, a model folder, or a .gguf file")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument("--system", default=None, help="a system message before the conversation")
    parser.add_argument("--chat_template", default=None, help="a Jinja chat template file to use instead")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top_p", type=float, default=1.0, help="with --temperature > 0")
    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    args = parser.parse_args(argv)
    try:
        if args.chat_template and not Path(args.chat_template).is_file():
            raise ConfigError(f"--chat_template {args.chat_template}: no such file")
        model, tokenizer, template = load(args.model)
        if args.chat_template:
            tokenizer.chat_template, template = Path(args.chat_template).read_text(), args.chat_template
        if not tokenizer.chat_template:
            raise ConfigError(f"{args.model} has no chat template; pass --chat_template FILE (a Jinja template, e.g. "
                              "an instruct model's chat_template.jinja)")
    except ConfigError as error:
        print(f"chat: error: {error}", file=sys.stderr)
        sys.exit(2)
    import torch

    torch.manual_seed(args.seed)
    mode = "greedy" if args.temperature <= 0 else f"sampling at temperature {args.temperature}, top_p {args.top_p}"
    positions = getattr(model.config, "max_position_embeddings", None)
    limit = f" (fewer where the model's {positions} positions end)" if positions and positions <= args.max_new_tokens else ""
    print(f"chat template: {template}; {mode}, at most {args.max_new_tokens} new tokens{limit}", file=sys.stderr)
    chat = Chat(model, tokenizer, args.system, args.max_new_tokens, args.temperature, args.top_p)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return
    print("type a message; /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.reset()
            continue
        if text:
            print("model> ", end="", flush=True)
            chat.reply(text)


if __name__ == "__main__":
    main()
