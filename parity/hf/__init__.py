"""Hugging Face transformers export and import: `convert_checkpoint --to hf|hf-mixtral`, and `--to hf`
directories as SRC. configuration_blues.py and modeling_blues.py are the templates copied into each
export (self-contained: torch and transformers only)."""
