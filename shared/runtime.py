"""Running θ′ on P2: the stock class built on the meta device, loaded by assignment.

P2 holds no embedding module. The stock classes still declare the embedding parameters
they would use for `input_ids`; those stay unmaterialised placeholders (empty tensors), which
the forward on `inputs_embeds` never touches.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from shared.errors import CheckpointError
from shared.families import CloudOutput, Config, Family, get_family
from shared.wire import read_header

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CloudModel:
    """θ′ on a device, with the family's forward. Holds no secret and no embedding."""

    def __init__(self, family: Family, config: Config, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.family, self.config, self.model = family, config, model
        self.device, self.dtype = device, dtype
        self.dims = family.dims(config)

    @torch.inference_mode()
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        *,
        last_only: bool = False,
    ) -> CloudOutput:
        """(B, S, d) permuted by π -> permuted output, on this model's device and dtype.
        `last_only`: only the last position's output is needed (see `Family.cloud_forward`)."""
        x = inputs_embeds.to(self.device, self.dtype)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.family.cloud_forward(self.model, x, mask, cache, last_only)


def load_cloud_model(
    config: Config,
    files: Iterable[Path],
    *,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    on_progress: Callable[[int, int], None] | None = None,
) -> CloudModel:
    """Build the stock class for `config` and assign θ′ from safetensors `files`.

    Fails loudly, naming tensors, on missing or unexpected keys and shape mismatches; the
    only parameters allowed to stay unloaded are the embedding placeholders.
    `on_progress(done, total)`: bytes of tensors read (as stored in `files`) of all of them,
    from (0, total) to (total, total).
    """
    from shared.families import detect_family

    fam = detect_family(config)  # architectures and model_type agree (the class comes from model_type)
    if family and get_family(family) is not fam:
        raise CheckpointError(f"the config describes a {fam.name} model, not the {family} family")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    dev = torch.device(device)
    with _parameters_on_meta():
        model = fam.build_cloud_model(config)
    state: dict[str, torch.Tensor] = {}
    paths = [Path(path) for path in files]
    headers = [read_header(path)[0] for path in paths]
    total = sum(info.end - info.start for header in headers for info in header.values())
    done = 0
    if on_progress is not None:
        on_progress(0, total)
    for path, header in zip(paths, headers, strict=True):
        with safe_open(str(path), "pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                state[name] = f.get_tensor(name).to(dev, torch_dtype)
                done += header[name].end - header[name].start
                if on_progress is not None:
                    on_progress(done, total)
    state = fam.module_state(state, config)
    expected = dict(model.state_dict(keep_vars=True))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in state if n in expected and tuple(expected[n].shape) != tuple(state[n].shape))
    if unexpected or wrong:
        raise CheckpointError(
            f"cloud checkpoint does not fit the {fam.name} model: unexpected {unexpected}, wrong shape {wrong}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    lacking = [n for n in missing if not fam.is_embedding_parameter(n, config)]
    if lacking:
        raise CheckpointError(f"cloud checkpoint lacks {lacking}")
    for name in missing:
        _set_param(model, name, nn.Parameter(torch.empty(0, device=dev, dtype=torch_dtype), requires_grad=False))
    model.to(dev).eval()
    model.requires_grad_(False)
    return CloudModel(fam, config, model, dev, torch_dtype)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a module with its parameters on the meta device and its buffers real.

    Parameters are then assigned from θ′ without a second copy; buffers (rotary
    frequencies, position ids) are computed by the stock code as usual.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, value)
