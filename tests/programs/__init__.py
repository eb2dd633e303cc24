"""Programs the tests run in processes of their own, as `python -m tests.programs.NAME`
from the repository root, with their arguments on the command line."""
