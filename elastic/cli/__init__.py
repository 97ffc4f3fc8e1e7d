"""The ``elastic`` command line."""
