"""`dtrain` command line: `dtrain.cli.parser` parses, one module per command runs it."""

from dtrain.cli.parser import main as main
