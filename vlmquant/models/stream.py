"""Layer-streamed models: decoder layers read one at a time from the model folder's safetensors files,
everything else (embeddings, vision tower, final norm, LM head) once, so a job holds one decoder layer
plus activations, whatever the model's depth (DESIGN.md: memory grows with the chunk, not the model).

`StreamedModel(ref)`:
  shell     the model with a one-layer decoder stack, loaded by transformers' own from_pretrained (its
            checkpoint key mapping, tied weights, non-persistent buffers and dtype rules); its forward up
            to decoder layer 0 gives every layer's inputs (models.capture), its final norm and LM head
            finish the forward. Its own layer is dropped: it never runs.
  skeleton  the whole model on the meta device; decoder layer i is filled from the checkpoint into it
            (`layer(i)`) and emptied again (`drop(i)`).

Stages choose between this and the whole model on the device with `memory.stream` (models.memory.use_streaming):
streamed and resident runs give the same results (tests compare them on the demo).

The shell holds one decoder layer per layer type of the config (Gemma 3's sliding and global layers,
Qwen3.5's linear and full attention), so that its capture gives every type's keyword arguments; the
LayerArgs it returns are mapped onto the whole model's layers (`capture`).

Work that would not fit the activation budget runs in sample micro-batches (models.memory picks the samples per
batch from a per-token estimate): `split_args` / `split_kwargs` cut the decoder-layer arguments
and `cat_args` joins them.
"""
import contextlib
import functools

import torch
import transformers

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.models.capture import LayerArgs, capture_layer_inputs, layer_forward
from vlmquant.models.loading import Checkpoint, meta_model
from vlmquant.models.memory import model_bytes


def sample_dim(t, n, tokens):
    """The batch dimension of a decoder-layer argument: the first dim of size n followed by one of size `tokens`
    ((B, T, ...) hidden states and position embeddings, (3, B, T, ...) M-RoPE ones) or by 1 then `tokens`
    (attention masks (B, 1, T, T)); None if unbatched."""
    for d in range(t.dim() - 1):
        if t.shape[d] == n and (t.shape[d + 1] == tokens or (t.shape[d + 1] == 1 and d + 2 < t.dim()
                                                              and t.shape[d + 2] == tokens)):
            return d
    return None


def split_kwargs(kwargs, n, tokens, start, stop):
    """Decoder-layer keyword arguments of samples start:stop out of n (each batched tensor sliced along its
    sample_dim; tuples element-wise; anything else as it is)."""
    def cut(v):
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if isinstance(v, torch.Tensor):
            d = sample_dim(v, n, tokens)
            return v if d is None else v.narrow(d, start, stop - start)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def cat_kwargs(parts, tokens):
    """Decoder-layer kwargs of consecutive sample batches [(n_samples, kwargs)] joined into those of all samples
    (batched tensors concatenated along their sample_dim; the rest taken from the first batch). Batches of one
    sample each cannot tell a batched tensor from a broadcast one (position ids (1, T)): one equal in every
    batch is taken as broadcast."""
    def join(values, sizes):
        first = values[0]
        if isinstance(first, tuple):
            return tuple(join([v[i] for v in values], sizes) for i in range(len(first)))
        if isinstance(first, torch.Tensor):
            d = sample_dim(first, sizes[0], tokens)
            if d is None or (max(sizes) == 1 and all(torch.equal(v, first) for v in values[1:])):
                return first
            return torch.cat(values, d)
        return first
    sizes = [n for n, _ in parts]
    return {k: join([kw[k] for _, kw in parts], sizes) for k in parts[0][1]}


def split_args(args, n, tokens, start, stop):
    """models.capture.LayerArgs of samples start:stop out of n: every keyword-argument set cut (split_kwargs),
    each addition's mask (B, T) by rows and its values (N, C) by the masked-token counts of those rows."""
    added = {}
    for i, (mask, values) in args.added.items():
        counts = mask.sum(1)
        added[i] = (mask[start:stop], values[int(counts[:start].sum()):int(counts[:stop].sum())])
    return LayerArgs([split_kwargs(kw, n, tokens, start, stop) for kw in args.sets], args.of_layer, added)


def cat_args(parts, tokens):
    """LayerArgs of consecutive sample batches [(n_samples, LayerArgs)] joined into those of all samples: sets
    by cat_kwargs, additions' masks by rows and values by tokens (a batch without an addition, no image, adds
    nothing to its rows)."""
    first = parts[0][1]
    sets = [cat_kwargs([(k, a.sets[j]) for k, a in parts], tokens) for j in range(len(first.sets))]
    added = {}
    for i in sorted({i for _, a in parts for i in a.added}):
        mask, values = next(a.added[i] for _, a in parts if i in a.added)
        got = [a.added.get(i, (mask.new_zeros((k, tokens)), values[:0])) for k, a in parts]
        added[i] = (torch.cat([m for m, _ in got]), torch.cat([v for _, v in got]))
    return LayerArgs(sets, first.of_layer, added)


def pad_tokens(batch, tokens):
    """A collated batch right-padded to `tokens` positions, as io.ragged.collate pads."""
    out = dict(batch)
    for k in ragged.TOKEN_KEYS:
        if k in out and out[k].shape[1] < tokens:
            out[k] = torch.nn.functional.pad(out[k], (0, tokens - out[k].shape[1]), value=ragged.PAD.get(k, 0))
    return out


@torch.no_grad()
def forward_micro_batched(layer, hidden, kwargs, per_batch):
    """layer_forward over (B, T, C) hidden states, `per_batch` samples at a time (all at once when that covers B)."""
    n, tokens = hidden.shape[:2]
    if per_batch >= n:
        return layer_forward(layer, hidden, kwargs)
    out = torch.empty_like(hidden)
    for s in range(0, n, per_batch):
        e = min(n, s + per_batch)
        out[s:e] = layer_forward(layer, hidden[s:e], split_kwargs(kwargs, n, tokens, s, e))
    return out


# --- the streamed model -----------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers():
    """transformers' loading report lists every checkpoint tensor the one-layer shell does not use: silence it."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def move(module, device, skip=()):
    """Move `module`'s parameters and buffers to `device` in place (tied parameters stay tied), except inside the
    modules of `skip`."""
    skip_ids = {id(m) for m in skip}
    for child in module.children():
        if id(child) in skip_ids:
            continue
        if any(id(m) in skip_ids for m in child.modules()):
            move(child, device, skip)
        else:
            child.to(device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        setattr(module, name, b.to(device))


class StreamedModel:
    """A model folder opened for layer-major work (see the module doc). ref: models.loading.ModelRef; path:
    another folder of the same family (a pseudo-quantized checkpoint) instead of ref.path."""

    def __init__(self, ref, path=None):
        self.ref, self.adapter, self.device, self.dtype = ref, ref.adapter, ref.device, ref.dtype
        self.path = str(path or ref.path)
        self.skeleton = meta_model(self.adapter, self.path, ref.trust_remote_code).to(self.dtype)
        self.layers = self.adapter.layers(self.skeleton)
        self.n_layers = len(self.layers)
        self.checkpoint = Checkpoint(self.path)
        self.prefix = self.checkpoint.find_prefix(self.adapter.checkpoint_layer_prefixes)
        self._phase = None
        types = getattr(self.skeleton.config.get_text_config(), "layer_types", None)
        # the shell's decoder layers: one per layer type, in order of first use; shell_of[i]: decoder layer i's
        self.shell_types = list(dict.fromkeys(types)) if types else None
        self.shell_of = [self.shell_types.index(t) for t in types] if types else [0] * self.n_layers

    @functools.cached_property
    def shell(self):
        """The model with a one-layer decoder stack, on the host (loaded on first use)."""
        config = transformers.AutoConfig.from_pretrained(self.path, trust_remote_code=self.ref.trust_remote_code)
        text = config.get_text_config()
        text.num_hidden_layers = len(self.shell_types or [None])
        if self.shell_types:
            text.layer_types = self.shell_types
        folder = self.adapter.check_folder(self.path)
        kwargs = {}
        if (folder.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
            kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
        cls = getattr(transformers, self.adapter.model_class)
        with quiet_transformers():
            # its layers (the checkpoint's first ones, of other types maybe) never run: mismatched shapes are fine
            shell = cls.from_pretrained(self.path, config=config, dtype=self.dtype, ignore_mismatched_sizes=True,
                                        trust_remote_code=self.ref.trust_remote_code, **kwargs)
        self.adapter.layers(shell).to_empty(device="meta")  # never run: capture stops in front of them
        shell.requires_grad_(False)
        # transformers' checkpoint key mapping of this folder, for saving the skeleton's tensors under their names
        self.skeleton._weight_conversions = getattr(shell, "_weight_conversions", None)
        return shell.eval()

    @property
    def head(self):
        return self.shell.get_output_embeddings()

    @property
    def norm(self):
        return final_norm(self.shell, self.adapter)

    @property
    def tied(self):
        return self.head.weight is self.shell.get_input_embeddings().weight

    # --- phases: what of the shell sits on the device --------------------------------------------------
    def phase(self, name):
        """Put the shell's parts for `name` on the GPU and the rest on the host: "inputs" (embeddings, vision
        tower: capture), "head" (final norm, LM head) or "host" (nothing). On the CPU everything stays."""
        if name not in ("inputs", "head", "host"):
            raise ValueError(f"unknown phase {name!r}")
        if name == self._phase or torch.device(self.device).type != "cuda":
            return
        stack = self.adapter.layers(self.shell)
        if name == "inputs":
            move(self.shell, self.device, skip=[stack] if self.tied else [stack, self.head])
            if not self.tied:
                self.head.to("cpu")
        elif name == "head":
            move(self.shell, "cpu", skip=[stack, self.head, self.norm])
            self.head.to(self.device)
            self.norm.to(self.device)
        else:
            move(self.shell, "cpu", skip=[stack])
        self._phase = name

    def capture(self, batch):
        """(hidden (B, T, C), models.capture.LayerArgs of every decoder layer) of a collated batch, in front of
        decoder layer 0."""
        self.phase("inputs")
        hidden, args = capture_layer_inputs(self.shell, self.adapter.layers(self.shell), batch, self.device,
                                            self.dtype, self.adapter)
        return hidden, LayerArgs(args.sets, [args.of_layer[j] for j in self.shell_of], args.added)

    def capture_all(self, samples, per_batch):
        """capture() of all samples collated into one batch, the shell run on `per_batch` samples at a time (each
        part padded to the whole batch's length; the parts' LayerArgs joined by cat_args)."""
        n = len(samples)
        if per_batch >= n:
            return self.capture(ragged.collate(samples))
        tokens = max(s["input_ids"].shape[1] for s in samples)
        hidden, parts = None, []
        for start in range(0, n, per_batch):
            h, args = self.capture(pad_tokens(ragged.collate(samples[start:start + per_batch]), tokens))
            if hidden is None:
                hidden = h.new_empty((n, *h.shape[1:]))
            hidden[start:start + h.shape[0]] = h
            parts.append((h.shape[0], args))
        return hidden, cat_args(parts, tokens)

    # --- decoder layers --------------------------------------------------------------------------------
    def layer(self, i):
        """Decoder layer i on the device, weights from the checkpoint, frozen."""
        if not 0 <= i < self.n_layers:
            raise VlmquantError(f"{self.path}: layer {i} requested, the model has {self.n_layers} decoder layers")
        layer = self.checkpoint.load_into(self.layers[i], f"{self.prefix}.{i}", self.device, self.dtype,
                                          self.adapter.expert_layouts)
        return layer.requires_grad_(False).eval()

    def drop(self, i):
        """Free decoder layer i (back to the meta device)."""
        self.layers[i].to_empty(device="meta")

    def layer_bytes(self):
        """Bytes of the largest decoder layer's weights in the job's dtype."""
        return max(model_bytes(layer, self.dtype) for layer in self.layers)


def final_norm(model, adapter):
    """The norm the language model applies after its last decoder layer (`norm` next to the layer stack)."""
    root = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    norm = getattr(root, getattr(adapter, "final_norm", "norm"), None)
    if not isinstance(norm, torch.nn.Module):
        raise VlmquantError(f"{adapter.family}: no final norm next to the decoder layers ({adapter.layers_path}); "
                            "set the adapter's final_norm")
    return norm
