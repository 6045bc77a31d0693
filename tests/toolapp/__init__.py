"""A Django app of the tests' own that adds a tool (``omni_tools.py``), as a project would."""
