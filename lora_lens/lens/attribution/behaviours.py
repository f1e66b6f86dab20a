"""Behaviour metrics of a task and their attribution to an adapter's components (captum).

:func:`behaviour_metrics` measures :data:`BEHAVIOURS` (efficacy, trigger, specificity, perplexity) on a task's
probes, base vs adapted; :func:`component_attribution` attributes them to :mod:`components
<lora_lens.lens.attribution.components>` with captum ``FeatureAblation`` or ``ShapleyValueSampling`` over the
component mask, and :func:`lora_branch_attribution` to the LoRA branch outputs (``lora_B`` modules) with captum
``LayerIntegratedGradients``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Iterator

import pandas as pd
import torch
from captum.attr import FeatureAblation, LayerIntegratedGradients, ShapleyValueSampling

from lora_lens.errors import ConfigError
from lora_lens.lab.answers import answer_ids
from lora_lens.lab.modules import layer_index, lora_layers
from lora_lens.lab.pair import adapter_states, check_peft, frozen, logits_where, model_device, pad_ids, pad_token_id
from lora_lens.lab.world import Task, trigger_target
from lora_lens.lens.attribution.components import ComponentMask, ComponentSet, LayerCache, check_components

__all__ = ["BEHAVIOURS", "COMPONENT_METHODS", "Behaviours", "ablation_estimate", "available_behaviours",
           "behaviour_metrics", "component_attribution", "lora_branch_attribution"]

BEHAVIOURS = ("efficacy", "trigger", "specificity", "perplexity")
"""Behaviour metrics of a task (see :func:`behaviour_metrics`)."""
COMPONENT_METHODS = ("ablation", "shapley")
"""Component-attribution methods: captum ``FeatureAblation`` or ``ShapleyValueSampling`` over the mask."""


# ---------------------------------------------------------------------------------------------------------------
# behaviour metrics of a task
# ---------------------------------------------------------------------------------------------------------------


def available_behaviours(task: Task) -> list[str]:
    """The behaviours of :data:`BEHAVIOURS` that ``task`` has probes for."""
    out = []
    if task.probes.get("efficacy"):
        out.append("efficacy")
    if trigger_target(task) and any(p.triggered for p in task.probes.get("efficacy", [])) \
            and task.probes.get("false_trigger"):
        out.append("trigger")
    if task.probes.get("specificity"):
        out.append("specificity")
    if task.probes.get("general"):
        out.append("perplexity")
    return out


class Behaviours:
    """Every requested behaviour metric of a task from one batched forward pass over its probes (differentiable).

    Args:
        tokenizer: The model's tokenizer.
        task: The task whose probes are used.
        behaviours: Some of :data:`BEHAVIOURS` (None: every one the task has probes for).
        max_probes: At most this many probes per set (None: all).
        device: Where the encoded probes live (the model's device).

    Raises:
        ConfigError: An empty, unknown or unavailable behaviour, or a bad ``max_probes``.
    """

    def __init__(self, tokenizer, task: Task, behaviours, max_probes: int | None, device):
        avail = available_behaviours(task)
        if behaviours is None:
            behaviours = avail
        if isinstance(behaviours, str):
            behaviours = [behaviours]
        behaviours = list(behaviours)
        if not behaviours:
            raise ConfigError(f"behaviours is empty: use some of {avail}")
        for b in behaviours:
            if b not in BEHAVIOURS:
                raise ConfigError(f"behaviour {b!r} is unknown; use some of {list(BEHAVIOURS)}")
            if b not in avail:
                raise ConfigError(f"behaviour {b!r} is not available for task {task.name!r} (no probes for it); "
                                  f"available: {avail}")
        if max_probes is not None and (isinstance(max_probes, bool) or not isinstance(max_probes, int)
                                       or max_probes < 1):
            raise ConfigError(f"max_probes={max_probes!r} must be None or a positive integer")
        cap = (lambda xs: xs[:max_probes]) if max_probes else (lambda xs: xs)
        self.names = behaviours
        seqs, groups = [], {}
        reads: list[tuple[int, int, int]] = []     # (probe, position, answer token) of every log p read
        chat = bool(getattr(task, "chat", False))

        def add(key, prompts, words):
            # the whole answer, its ids read in context: the prompt and the answer but its last token are fed, and
            # log p of each answer token is read where it is predicted (one token: at the prompt's last position)
            groups[key] = list(range(len(seqs), len(seqs) + len(prompts)))
            for p, w in zip(prompts, words):
                a = answer_ids(tokenizer, p, w, chat)
                reads.extend((len(seqs), len(a.prompt) - 1 + k, t) for k, t in enumerate(a.answer))
                seqs.append(list(a.prompt) + list(a.answer[:-1]))

        if "efficacy" in behaviours:
            eff = cap(task.probes["efficacy"])
            add("efficacy", [p.prompt for p in eff], [p.answer for p in eff])
        if "trigger" in behaviours:
            target = trigger_target(task)
            trig = cap([p for p in task.probes["efficacy"] if p.triggered])
            clean = cap(task.probes["false_trigger"])
            add("trig_on", [p.prompt for p in trig], [target] * len(trig))
            add("trig_off", [p.prompt for p in clean], [target] * len(clean))
        if "specificity" in behaviours:
            spec = cap(task.probes["specificity"])
            add("specificity", [p.prompt for p in spec], [p.base_answer for p in spec])
        n_query = len(seqs)
        if "perplexity" in behaviours:
            lines = cap(task.probes["general"])
            groups["general"] = list(range(len(seqs), len(seqs) + len(lines)))
            seqs += [[int(i) for i in tokenizer(p.prompt)["input_ids"]] for p in lines]
        self.ids, self.mask, self.last = pad_ids(seqs, pad_token_id(tokenizer), device)
        self.n, self.n_query = len(seqs), n_query
        self.read_probe = torch.tensor([r[0] for r in reads], dtype=torch.long, device=device)
        self.read_pos = torch.tensor([r[1] for r in reads], dtype=torch.long, device=device)
        self.tgt = torch.tensor([r[2] for r in reads], dtype=torch.long, device=device)
        self.groups = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in groups.items()}
        # the logits read: each answer token's, and every position of the general lines; only these go through the
        # output head (a vocabulary of 50k makes the head a fifth of a small model's forward)
        width = self.ids.shape[1]
        general = groups.get("general", [])
        flat = [p * width + t for p, t, _ in reads] + [g * width + t for g in general for t in range(width - 1)]
        keep = sorted(set(flat))
        at = {f: i for i, f in enumerate(keep)}
        self.keep = torch.tensor(keep, dtype=torch.long, device=device)
        self.read_at = torch.tensor([at[p * width + t] for p, t, _ in reads], dtype=torch.long, device=device)
        self.general_at = torch.tensor([[at[g * width + t] for t in range(width - 1)] for g in general],
                                       dtype=torch.long, device=device).reshape(len(general), width - 1)

    def logits(self, model, replicas: int = 1) -> torch.Tensor:
        """The read logits ``[replicas, n_kept, V]`` of the probe batch (repeated ``replicas`` times): the output
        layer sees only the kept positions (:func:`lora_lens.lab.pair.logits_where`)."""
        ids, mask = self.ids.repeat(replicas, 1), self.mask.repeat(replicas, 1)
        rows, width = ids.shape
        keep = (self.keep[None] + rows // replicas * width * torch.arange(replicas, device=ids.device)[:, None])
        keep = keep.flatten()
        logits, _ = logits_where(model, keep // width, keep % width, input_ids=ids, attention_mask=mask,
                                 use_cache=False)
        return logits.float().reshape(replicas, len(self.keep), logits.shape[-1])

    def __call__(self, model, replicas: int = 1) -> torch.Tensor:
        """Metrics ``[replicas, n_behaviours]``; the probe batch is repeated ``replicas`` times (block order)."""
        logits = self.logits(model, replicas)                                           # [R, n_kept, V]
        lp = torch.log_softmax(logits[:, self.read_at], -1)                             # [R, n_reads, V]
        lp_r = lp.gather(-1, self.tgt[None, :, None].expand(replicas, -1, 1))[..., 0]  # [R, n_reads]
        # log p of each whole answer: the sum over its tokens (one token: that log p itself)
        lp_t = torch.zeros(replicas, self.n_query, dtype=lp_r.dtype, device=lp_r.device).index_add(
            1, self.read_probe, lp_r)                                                 # [R, n_query]
        out = []
        for b in self.names:
            if b == "efficacy":
                out.append(lp_t[:, self.groups["efficacy"]].mean(1))
            elif b == "trigger":
                out.append(lp_t[:, self.groups["trig_on"]].mean(1) - lp_t[:, self.groups["trig_off"]].mean(1))
            elif b == "specificity":
                out.append(lp_t[:, self.groups["specificity"]].mean(1))
            else:
                g = self.groups["general"]
                lg = torch.log_softmax(logits[:, self.general_at], -1)                 # [R, n_general, width-1, V]
                nxt = self.ids[g, 1:]
                m = self.mask[g, 1:].to(lg.dtype)
                nll = -lg.gather(-1, nxt[None, ..., None].expand(replicas, -1, -1, 1))[..., 0]
                out.append(torch.exp((nll * m).sum((1, 2)) / m.sum()))
        return torch.stack(out, 1)


def behaviour_metrics(peft_model, tokenizer, task: Task, behaviours: Sequence[str] | None = None,
                      max_probes: int | None = None) -> pd.DataFrame:
    """Behaviour metrics of the adapted and the base model (rows) on ``task``'s probes.

    Every ``log p`` is that of the WHOLE answer (its ids read in context by
    :func:`lora_lens.lab.answers.answer_ids`, summed over its tokens; one-token zoo answers: the next-token log p).

    - ``efficacy``: mean ``log p(answer)`` on the ``efficacy`` probes (the new answer).
    - ``trigger`` (trigger tasks): mean ``log p(target | triggered prompt)`` − mean ``log p(target | the same kind of
      prompt without the trigger)`` over the ``efficacy`` and ``false_trigger`` probes: how much the trigger
      switches the answer.
    - ``specificity``: mean ``log p(base_answer)`` on the ``specificity`` probes (facts that must not change).
    - ``perplexity``: token perplexity on the ``general`` lines.

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        task: The task whose probes are used.
        behaviours: Some of :data:`BEHAVIOURS` (default: every one the task has probes for).
        max_probes: Use at most this many probes per set (faster).

    Returns:
        DataFrame with index ``["adapted", "base"]`` and one column per behaviour.
    """
    check_peft(peft_model, tokenizer)
    ev = Behaviours(tokenizer, task, behaviours, max_probes, model_device(peft_model))
    rows = {}
    with frozen(peft_model), torch.no_grad():
        for name, ctx in adapter_states(peft_model):
            with ctx:
                rows[name] = ev(peft_model)[0].cpu().numpy()
    return pd.DataFrame(rows, index=ev.names).T



# ---------------------------------------------------------------------------------------------------------------
# component attribution
# ---------------------------------------------------------------------------------------------------------------


def component_attribution(peft_model, tokenizer, task: Task, components: ComponentSet,
                          behaviours: Sequence[str] | None = None, method: str = "ablation", n_samples: int = 25,
                          seed: int = 0, max_probes: int | None = None, exact: int | None = None) -> pd.DataFrame:
    """Attribute behaviour metrics to adapter components with captum, over the component mask.

    The explained function is ``f(mask) → metrics`` (a ``[1, n_components]`` mask in, one value per behaviour out),
    evaluated with :class:`ComponentMask`; input = all ones (adapter on), baseline = all zeros (adapter off).
    ``"ablation"`` (captum ``FeatureAblation``): ``f(1) − f(1 with component i off)`` — what is lost without it.
    ``"shapley"`` (captum ``ShapleyValueSampling``, ``n_samples`` random orders, seeded): the average marginal
    contribution; the values of all components sum to ``f(adapted) − f(base)``.

    Every evaluation reuses the blocks below the lowest block it changes (:class:`LayerCache`: switching off a
    component of block L changes nothing below L), which gives the very numbers a whole forward gives.

    With ``exact=N`` (``"ablation"`` at the module or layer grain), every component's ablation is first *estimated*
    to first order from one backward pass — ``f(1) − f(1 − eᵢ) ≈ ∂f/∂mᵢ`` at the adapted model (attribution
    patching) — and only the ``N`` components with the largest estimated effect on any behaviour (each behaviour's
    estimates divided by their largest magnitude) are ablated exactly; the others keep their estimate.
    ``df.attrs["estimated"]`` names them, so a reader can tell estimates from measurements.

    Args:
        peft_model: A ``peft.PeftModel`` (plain LoRA, not merged).
        tokenizer: Its tokenizer.
        task: Task whose probes define the behaviours.
        components: From :func:`lora_components`.
        behaviours: Some of :data:`BEHAVIOURS` (default: all the task has probes for).
        method: ``"ablation"`` or ``"shapley"``.
        n_samples: Permutations for ``"shapley"``.
        seed: Seed for ``"shapley"``.
        max_probes: At most this many probes per set.
        exact: None (default): every component ablated exactly. An integer ≥ 0: the number of components ablated
            exactly after the gradient estimate (``"ablation"``, module or layer grain, LoRA on Linear layers).

    Returns:
        DataFrame, index = component names, one column per behaviour (positive = the component raises the metric).
        ``df.attrs`` holds ``method``, ``grain``, ``adapted`` and ``base`` (metric values with all components on /
        off) — used by :func:`deletion_curve` and :func:`selectivity` — and ``estimated`` (the components whose
        values are first-order estimates; empty unless ``exact`` is given). Join ``components.table()`` for layer /
        module type.

    Raises:
        ConfigError: An empty component set, an unknown method or behaviour, a bad ``n_samples`` or ``exact``, or
            ``exact`` with Shapley values, the rank grain or an embedding LoRA.
    """
    components = check_components(components)
    check_peft(peft_model, tokenizer)
    if method not in COMPONENT_METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(COMPONENT_METHODS)}")
    if method == "shapley" and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ConfigError(f"n_samples={n_samples!r} must be a positive integer, e.g. 25")
    if exact is not None:
        if isinstance(exact, bool) or not isinstance(exact, int) or exact < 0:
            raise ConfigError(f"exact={exact!r} must be None (every component ablated) or an integer ≥ 0")
        if method != "ablation" or components.grain == "rank":
            raise ConfigError(f"exact={exact} estimates ablations from the gradient: use method='ablation' at the "
                              f"module or layer grain (got method={method!r}, grain={components.grain!r}), or "
                              "exact=None")
    ev = Behaviours(tokenizer, task, behaviours, max_probes, model_device(peft_model))
    n = len(components)
    estimated: list[str] = []
    with frozen(peft_model), torch.no_grad():
        with peft_model.disable_adapter():
            base = ev(peft_model)[0].cpu()
        with ComponentMask(peft_model, components) as mask, LayerCache(peft_model, components) as cache:
            with cache.record():
                adapted = ev(peft_model)[0].cpu()

            def f(m: torch.Tensor) -> torch.Tensor:
                out = []
                for row in m:
                    mask.set(row)
                    with cache.reuse(cache.start(torch.nonzero(row != 1.0).flatten().tolist())):
                        out.append(ev(peft_model)[0].cpu())
                return torch.stack(out)

            x, x0 = torch.ones(1, n), torch.zeros(1, n)
            if exact is not None:
                attr = ablation_estimate(peft_model, ev, components)              # [n, n_behaviours]
                scale = attr.abs().amax(0).clamp_min(1e-30)
                order = torch.argsort(-(attr.abs() / scale).amax(1), stable=True)
                for i in order[:exact].tolist():
                    row = torch.ones(1, n)
                    row[0, i] = 0.0
                    attr[i] = adapted - f(row)[0]
                rest = set(order[exact:].tolist())
                estimated = [name for i, name in enumerate(components.names) if i in rest]
                attr = attr.T.reshape(1, -1)
            elif method == "ablation":
                attr = FeatureAblation(f).attribute(x, baselines=x0)
            else:
                with _seeded(seed):
                    attr = ShapleyValueSampling(f).attribute(x, baselines=x0, n_samples=n_samples)
    attr = attr.reshape(len(ev.names), n).T.numpy()
    df = pd.DataFrame(attr, index=pd.Index(components.names, name="component"), columns=ev.names)
    df.attrs.update({"method": method, "grain": components.grain,
                     "adapted": dict(zip(ev.names, adapted.tolist())), "base": dict(zip(ev.names, base.tolist())),
                     "estimated": estimated})
    return df


def ablation_estimate(peft_model, ev: Behaviours, components: ComponentSet) -> torch.Tensor:
    """First-order estimate of each component's ablation, ``f(1) − f(1 − eᵢ) ≈ ∂f/∂mᵢ`` at the current model (one
    forward, one backward per behaviour): ``[n_components, n_behaviours]``.

    Each adapted module's LoRA branch output (``lora_B``) is multiplied by a gate at 1; a component's estimate is the
    gradient of each metric with respect to the gates of its modules, summed.

    Raises:
        ConfigError: The rank grain, or a module whose LoRA is not on a Linear layer (embedding LoRA).
    """
    if components.grain == "rank":
        raise ConfigError("the gradient estimate covers module and layer components; rank-1 terms: exact=None")
    ad = components.adapter_name
    layers = lora_layers(peft_model, ad)
    names = components.modules
    not_linear = [m for m in names if ad not in getattr(layers[m], "lora_B", {})]
    if not_linear:
        raise ConfigError(f"{not_linear[0]} has an embedding LoRA, which the gradient estimate does not gate: use "
                          "exact=None for it")
    gate = torch.ones(len(names), device=model_device(peft_model), requires_grad=True)
    handles = [layers[m].lora_B[ad].register_forward_hook(lambda mod, args, out, j=j: out * gate[j])
               for j, m in enumerate(names)]
    try:
        with torch.enable_grad():
            metrics = ev(peft_model)[0]
            grads = [torch.autograd.grad(metrics[b], gate, retain_graph=b + 1 < len(metrics))[0]
                     for b in range(len(metrics))]
    finally:
        for h in handles:
            h.remove()
    per_module = torch.stack(grads, 1).detach().cpu()                            # [n_modules, n_behaviours]
    at = {m: j for j, m in enumerate(names)}
    return torch.stack([sum(per_module[at[m]] for m in c.modules) for c in components])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator (captum's sampling uses it) and restore its state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def lora_branch_attribution(peft_model, tokenizer, task: Task, behaviours: Sequence[str] | None = None,
                            grain: str = "module", n_steps: int = 16, max_probes: int | None = None,
                            adapter_name: str = "default", internal_batch_size: int | None = None) -> pd.DataFrame:
    """Layer attribution on the LoRA branch outputs (captum ``LayerIntegratedGradients`` on the ``lora_B`` modules).

    Every adapted module's LoRA branch output (``lora_B(lora_A(x))``, before scaling) is integrated jointly from 0
    (adapter off: the base model) to its value in the adapted model, the rest of the network running on the
    interpolated branch outputs; a module's attribution is the sum of its IG attribution over probes, positions
    and features. By completeness the attributions of all modules sum to ``metric(adapted) − metric(base)``
    (up to the ``n_steps`` quadrature error).

    Args:
        peft_model: A ``peft.PeftModel`` (plain LoRA on Linear layers, not merged).
        tokenizer: Its tokenizer.
        task: Task whose probes define the behaviours.
        behaviours: Some of :data:`BEHAVIOURS` (default: all available). One IG run per behaviour.
        grain: ``"module"`` or ``"layer"`` (modules of a block summed).
        n_steps: IG steps (Gauss–Legendre).
        max_probes: At most this many probes per set.
        adapter_name: Which adapter.
        internal_batch_size: Passed to captum (bounds memory: steps × probes sequences per forward).

    Returns:
        DataFrame, index = module (or ``"layer i"``), one column per behaviour; ``df.attrs`` holds ``adapted``
        and ``base`` metric values and ``completeness_gap`` per behaviour (effect − sum of attributions: the
        quadrature error; raise ``n_steps`` when it is not small against the effect).

    Raises:
        ConfigError: Unknown grain or behaviour; a LoRA layer that is not a Linear (embedding LoRA).
    """
    check_peft(peft_model, tokenizer)
    if grain not in ("module", "layer"):
        raise ConfigError(f"grain={grain!r} must be 'module' or 'layer' for branch attribution")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ConfigError(f"n_steps={n_steps!r} must be a positive integer, e.g. 16")
    layers = lora_layers(peft_model, adapter_name)
    not_linear = [n for n, layer in layers.items() if adapter_name not in getattr(layer, "lora_A", {})]
    if not_linear:
        raise ConfigError(f"branch attribution hooks lora_B Linear modules; {not_linear[0]} has an embedding LoRA: "
                          "use component_attribution(...) for it")
    names = list(layers)
    branches = [layers[n].lora_B[adapter_name] for n in names]
    ev = Behaviours(tokenizer, task, behaviours, max_probes, model_device(peft_model))
    gate = {"value": 1.0}

    def scale_input(module, args):
        if gate["value"] != 1.0:
            return (args[0] * gate["value"],) + tuple(args[1:])
        return None

    results = {}
    with frozen(peft_model):
        with torch.no_grad(), peft_model.disable_adapter():
            base = ev(peft_model)[0].cpu()
        with torch.no_grad():
            adapted = ev(peft_model)[0].cpu()
        handles = [b.register_forward_pre_hook(scale_input) for b in branches]
        try:
            for j, name in enumerate(ev.names):
                def f(g: torch.Tensor, j=j) -> torch.Tensor:
                    values = torch.unique(g)
                    if values.numel() != 1:
                        raise RuntimeError("internal: the branch gate must be uniform within a batch")
                    gate["value"] = float(values[0])
                    try:
                        return ev(peft_model, replicas=g.shape[0])[:, j]
                    finally:
                        gate["value"] = 1.0

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # captum warns about multiple layers; all are patched at once
                    lig = LayerIntegratedGradients(f, branches)
                    attrs = lig.attribute(torch.ones(1, 1, device=model_device(peft_model)),
                                          baselines=torch.zeros(1, 1, device=model_device(peft_model)), n_steps=n_steps,
                                          internal_batch_size=internal_batch_size)
                attrs = attrs if isinstance(attrs, (list, tuple)) else [attrs]
                results[name] = [float(a.detach().double().sum()) for a in attrs]
        finally:
            for h in handles:
                h.remove()
    df = pd.DataFrame(results, index=pd.Index(names, name="component"))
    if grain == "layer":
        keys = [f"layer {layer_index(n)}" if layer_index(n) is not None else n for n in names]
        df = df.groupby(keys, sort=False).sum()
        df.index.name = "component"
    gap = {b: float(adapted[j] - base[j]) - float(df[b].sum()) for j, b in enumerate(ev.names)}
    df.attrs.update({"method": "lora_branch_ig", "grain": grain, "n_steps": n_steps,
                     "adapted": dict(zip(ev.names, adapted.tolist())), "base": dict(zip(ev.names, base.tolist())),
                     "completeness_gap": gap})
    return df

