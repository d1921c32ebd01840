r"""What :func:`torch.distributed.fsdp.fully_shard` (FSDP2) did to a model, asked without
importing :mod:`torch.distributed`: a model can be sharded only once its modules are loaded, so
a module that is not loaded yet means "no"."""

import sys

from torch import Tensor
from torch.nn import Module


def fully_sharded(module: Module) -> bool:
    r"""Whether ``fully_shard()`` was applied to ``module`` itself (it then is an
    ``FSDPModule``, whose forward gathers its parameters)."""

    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(tensor: Tensor) -> bool:
    r"""Whether ``tensor`` is a :class:`torch.distributed.tensor.DTensor`: a shard of a
    parameter that ``fully_shard()`` manages, outside the forward that gathers it."""

    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)
