"""Small test files that tests/test_own_process.py copies into pytester's directory (as
conftest.py and test_*.py there) to exercise the own-process runner without TensorFlow.
Their names do not start with test_, so the suite itself never collects them."""
