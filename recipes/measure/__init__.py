"""What the measurement commands in launch/ share: the readers of their results files, and the blocks of the README
and docs written from those files."""
