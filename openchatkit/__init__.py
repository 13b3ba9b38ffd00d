"""OpenChatKit in Python: the library behind the scripts in data/, pretrained/, training/,
tools/, inference/, retrieval/ and evaluation/.

Importing the package has no side effects: no argument parsing, no process groups, no downloads.
"""

__version__ = "0.1.0"
