"""The hostile suite (issue 25): crafted files and numbers against every reader and CLI option."""
