"""Running at scale: compose (the deepspeed launcher command) and plan (per-GPU memory)."""
