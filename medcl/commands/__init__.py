"""One module per command: `add_parser(sub, parent)` declares its arguments and `run(a, progress, started)` calls
the library, so cli.py is a loop over them. A new command is one module here plus its name below."""
from . import cache, config, demo, embed, evaluate, export, finetune, predict, pretrain, select, views

# in the order `medcl --help` lists them
COMMANDS = {"demo": demo, "pretrain": pretrain, "finetune": finetune, "embed": embed, "evaluate": evaluate,
            "select": select, "predict": predict, "export": export, "views": views, "config": config, "cache": cache}
