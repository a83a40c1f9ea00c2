"""Pure rules: what the cabinet decides. Facts and time in, decisions out; no I/O."""
