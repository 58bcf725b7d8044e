"""The `toss-mlx` command line: parses options, calls toss_mlx, prints. No logic lives here."""
