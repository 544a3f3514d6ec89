"""The app's triggers, one blueprint per file; `function_app.py` registers them all."""
