"""The example domain: notes. Replace this folder with your own domain."""
