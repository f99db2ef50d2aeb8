"""The shipped experiment configs: one ``ml_collections`` file per paper table or runnable comparison.

Each module's ``get_config(arg)`` returns its config and its docstring gives the command, the runtime and the numbers
it should reach; ``common.py`` holds the arms and builders they share. The folder is also reachable as
``experiments/configs/`` in a checkout (a link to this one).
"""
