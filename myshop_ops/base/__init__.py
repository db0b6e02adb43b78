"""Pure building blocks, no I/O: the message contract, the profile math, document layouts, the LRU, terminal-safe
text, exit codes. Imports nothing else of the package."""
