"""Every cache method module, one import a line: importing a module registers its methods."""
from . import full  # noqa: F401
