"""Every cache method module, one import a line: importing a module registers its methods."""
from . import full  # noqa: F401
from .evict import streaming  # noqa: F401
from .evict import snapkv  # noqa: F401
from .evict import pyramidkv  # noqa: F401
from .evict import tova  # noqa: F401
from .evict import knorm  # noqa: F401
from .evict import adakv  # noqa: F401
from .select import quest  # noqa: F401
from .select import duo  # noqa: F401
from . import quant  # noqa: F401
from . import quant_storage  # noqa: F401  (quant/kv4/kv3/kv2 as storage under eviction)
