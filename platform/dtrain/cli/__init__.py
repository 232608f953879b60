"""`dtrain` command line: only the parsing. Each subcommand names the function that runs it (`dtrain.cli.parser`, re-exported)."""

from dtrain.cli.parser import _recipe_command as _recipe_command
from dtrain.cli.parser import build_parser as build_parser
from dtrain.cli.parser import _train_and_check as _train_and_check
from dtrain.cli.parser import _search as _search
from dtrain.cli.parser import _compare_and_sweep as _compare_and_sweep
from dtrain.cli.parser import _tools as _tools
from dtrain.cli.parser import _combining as _combining
from dtrain.cli.parser import main as main
