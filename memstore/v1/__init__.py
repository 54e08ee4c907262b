"""Generated protocol modules of memstore.v1 (made by protos/generate.py; do not edit)."""
