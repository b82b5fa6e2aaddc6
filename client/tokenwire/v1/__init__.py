"""Generated from protos/tokenwire/v1 by protos/generate.py (make proto). Never edit by hand."""
