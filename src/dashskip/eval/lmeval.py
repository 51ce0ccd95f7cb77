"""lm-evaluation-harness on the dashskip engine: a `dashskip` model type and offline copies of stock tasks.

lm-eval 0.4.13 finds a model type only in its registry; it has no entry-point plugin group, so `dashskip` exists
once this module is imported. `python -m dashskip.eval.lmeval ARGS` is lm-eval's own command line with that import
done and the local tasks (`local_tasks()`) on `--include_path`.

Every token of every request runs through `Engine.step` with the decider's states per token and layer, so the
scores are those of the chosen operating point, and what they cost (the compute ratio) is measured on the way.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import datasets
import lm_eval.models  # noqa: F401  the stock model types first: lm-eval loads them only into an empty registry
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm.auto import tqdm

from dashskip.api import DashModel, from_pretrained
from dashskip.core.decisions import Decider
from dashskip.core.files import atomic_write_text, cache_dir
from dashskip.data import find_data_file, hellaswag_records, read_jsonl, read_tsv
from dashskip.errors import DashskipError
from dashskip.eval.evaluation import executed_cost
from dashskip.methods import MethodOptions, build_decider
from dashskip.models.loading import DEFAULT_MODEL
from dashskip.runtime.generation import GenerationConfig, generate, produced_mask

log = logging.getLogger("dashskip.eval.lmeval")

# A lazy "module:class" target rather than the `register_model` decorator: `python -m dashskip.eval.lmeval` runs this
# file as `__main__` and the task configs import it again as `dashskip.eval.lmeval`; both register the same string,
# which the registry accepts, where two class objects under one name would be an error.
model_registry.register("dashskip", target="dashskip.eval.lmeval:DashskipLM")


def _model_and_decider(
    pretrained: str | DashModel,
    policy: str | None,
    speedup: float | None,
    method: str,
    mode: str | None,
    data_dir: str | None,
    seed: int,
) -> tuple[DashModel, Decider, float]:
    """The model, the decider that picks every token's states, and the operating point it targets."""
    if isinstance(pretrained, DashModel):
        if policy is not None or (mode is not None and method == "dash"):
            raise DashskipError(
                "a DashModel passed as `pretrained` brings its own policy and decision mode; set them where it is "
                "built (dashskip.from_pretrained or dashskip.apply)"
            )
        dm = pretrained
        if speedup is not None and method == "dash":
            dm.set_speedup(speedup)
    else:
        # A baseline's decider comes from the registry below; the model itself then runs at 1.0 (no policy needed).
        dash_speedup = 1.0 if speedup is None or method != "dash" else speedup
        dm = from_pretrained(pretrained, speedup=dash_speedup, policy=policy, mode=mode, wall_clock=False)
    if dm.tokenizer is None:
        raise DashskipError("the DashModel has no tokenizer; pass tokenizer= to dashskip.apply")
    if method == "dash":
        return dm, dm.decider, dm.speedup
    target = dm.speedup if speedup is None else float(speedup)
    options = MethodOptions(mode=mode, seed=seed)
    return dm, build_decider(dm.method_context(data_dir), method, target, options), target


def _batch_size(value: int | str) -> int:
    """lm-eval's CLI passes --batch_size as text; its 'auto' searches for the largest batch that fits in GPU memory."""
    if isinstance(value, str) and not value.isdigit():
        raise DashskipError(f"batch_size must be a number for the dashskip model (it runs on the CPU), got '{value}'")
    if int(value) < 1:
        raise DashskipError(f"batch_size must be at least 1, got {value}")
    return int(value)


class DashskipLM(TemplateLM):
    """lm-eval's `LM` on the dashskip engine: log-likelihoods and generations at one operating point.

    Tokenization, the empty-context rule (BOS, else EOS, as the context), left-truncation and stop strings follow
    lm-eval's `hf` model, so on the full model the two give the same numbers.
    """

    def __init__(
        self,
        pretrained: str | DashModel = DEFAULT_MODEL,
        policy: str | None = None,
        speedup: float | None = None,
        method: str = "dash",
        mode: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        data_dir: str | None = None,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        """`pretrained`: alias, folder, hub id or a DashModel; `speedup` None = 1.0 (or a given DashModel's own);
        `method`: 'dash' (the policy) or any other method of `dashskip.methods`; `mode`: the decision mode."""
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            # lm-eval's CLI passes cuda:0 unless told otherwise; the engine has CPU kernels only.
            log.warning("the dashskip engine runs on the CPU; device=%s is ignored", device)
        self.dm, self.decider, self.speedup = _model_and_decider(
            pretrained, policy, speedup, method, mode, data_dir, seed
        )
        self.method = method
        self.engine = self.dm.engine
        self.tokenizer = self.dm.tokenizer
        self.costs = self.dm.costs
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or resolve_max_length(self.dm.config, self.tokenizer))
        self.max_gen_toks = int(max_gen_toks)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        self.generator = torch.Generator().manual_seed(int(seed))
        self.tokens = 0  # tokens whose states count towards the compute ratio
        self.cost = 0.0  # their summed executed cost, in full layers (cost table)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request, as in lm-eval's `hf` model: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def compute_ratio(self) -> float:
        """Layers / mean executed cost per token, over every token so far (NaN before the first)."""
        if self.tokens == 0:
            return float("nan")
        return self.engine.backbone.num_layers * self.tokens / self.cost

    def get_model_info(self) -> dict[str, Any]:
        """Lands in lm-eval's results["config"], so a results file records what the scores cost."""
        return {
            "dashskip_method": self.method,
            "dashskip_speedup": self.speedup,
            "dashskip_compute_ratio": self.compute_ratio,
            "dashskip_tokens": self.tokens,
            "dashskip_cost_table_measured": self.costs.measured,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """The tokenizer's own special tokens, unless the text already starts with the prefix token (as `hf`)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _account(self, states: torch.Tensor) -> None:
        """Add (tokens, layers) states to the running compute ratio."""
        cost, tokens = executed_cost(self.costs, states, self.decider)
        self.tokens += tokens
        self.cost += cost

    def _log_ratio(self) -> None:
        log.info("compute ratio %.3f over %d tokens (method %s)", self.compute_ratio, self.tokens, self.method)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation and whether greedy decoding would produce it.

        Longest first, `batch_size` at a time, right-padded without an attention mask: under the causal mask no
        real token sees a padding key and positions stay 0..n-1, so each row's logits are the row's own.
        Every real token run counts towards the compute ratio.
        """
        order = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dashskip loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            rows = []
            for _, context, continuation in chunk:
                if len(continuation) > self.max_length:
                    raise DashskipError(
                        f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}; "
                        "raise max_length in --model_args"
                    )
                rows.append((context + continuation)[-(self.max_length + 1) : -1])  # left-truncated, as `hf`
            lengths = torch.tensor([len(row) for row in rows])
            ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
            result = self.engine.score(ids, self.decider, valid=valid)
            self._account(result.states[valid])
            for (request, _, continuation), length, hidden in zip(chunk, lengths.tolist(), result.hidden, strict=True):
                logits = self.engine.backbone.logits(hidden[length - len(continuation) : length]).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(continuation)
                answer = (
                    float(logprobs.gather(-1, target[:, None]).sum()),
                    bool((logprobs.argmax(-1) == target).all()),
                )
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        self._log_ratio()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint max_length windows, the first conditioned on the prefix token."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            pairs = lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations up to the first stop string, EOS or `max_gen_toks` tokens.

        Requests with the same generation options run `batch_size` at a time, longest prompt first, left-padded
        with an attention mask (the engine shifts positions and hides the padding). The paths that produced the
        new tokens count towards the compute ratio.
        """
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        eos = self.tokenizer.decode(self.eot_token_id)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dashskip generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            sampling = _sampling(kwargs)
            budget = self.max_length - max_new
            if budget < 1:
                raise DashskipError(
                    f"max_gen_toks {max_new} leaves no room for a prompt within max_length {self.max_length}"
                )
            prompts = [self.tok_encode(context)[-budget:] for context in contexts]
            for context, gen_kwargs, tokens in zip(
                contexts, all_kwargs, self._generate(prompts, max_new, until, sampling), strict=True
            ):
                text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        self._log_ratio()
        return order.get_original(results)

    @torch.no_grad()
    def _generate(
        self, prompts: list[list[int]], max_new: int, until: list[str], sampling: tuple[float, float] | None
    ) -> list[list[int]]:
        """New tokens per prompt; a row stops at EOS or once its text holds a stop string (cut there later)."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = torch.tensor(prompt)
            mask[r, width - len(prompt) :] = 1
        stops = [s for s in until if s]

        def stop(row: int, tokens: list[int]) -> bool:
            return bool(stops) and any(s in self.tokenizer.decode(tokens) for s in stops)

        temperature, top_p = sampling or (1.0, 1.0)
        config = GenerationConfig(max_new_tokens=max_new, do_sample=sampling is not None, temperature=temperature,
                                  top_p=top_p, eos_token_id=self.eot_token_id, pad_token_id=self.pad_id)  # fmt: skip
        out = generate(self.engine, ids, mask, self.decider, config, generator=self.generator, stop=stop)
        self._account(out.states[produced_mask(out.states, out.lengths)])
        return [out.sequences[r, width : width + n].tolist() for r, n in enumerate(out.lengths)]


def _sampling(kwargs: dict[str, Any]) -> tuple[float, float] | None:
    """(temperature, top_p) for sampled generation, None for greedy; any other option is an error, not ignored."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0))
    top_p = float(kwargs.pop("top_p", 1.0))
    if kwargs:
        raise DashskipError(
            f"generation options {sorted(kwargs)} are not supported by the dashskip model; it takes until, "
            "max_gen_toks, do_sample, temperature and top_p (drop the others from --gen_kwargs or the task)"
        )
    if not do_sample:
        return None
    if not temperature > 0 or not 0 < top_p <= 1:
        raise DashskipError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    return temperature, top_p


# ---- Offline copies of lm-eval's stock tasks ------------------------------------------------------------------
#
# Prompts, targets, choices and metrics are the stock YAMLs' (lm_eval/tasks/arc, hellaswag, glue/sst2, glue/rte);
# only the data source differs: a custom dataset reads the shared data folder's files and lays each row out as the
# Hugging Face dataset the stock templates expect. lm-eval calls a custom dataset with the task's metadata (model
# arguments included) plus `dataset_kwargs`, hence the `dashskip_` prefix there and `**metadata` here, unused.


def arc_docs(dashskip_file: str, **metadata: Any) -> datasets.DatasetDict:
    """AI2's ARC JSONL as `allenai/ai2_arc` rows (question, choices.text/label, answerKey), the test split."""
    rows = [
        {
            "id": item["id"],
            "question": item["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in item["question"]["choices"]],
                "label": [c["label"] for c in item["question"]["choices"]],
            },
            "answerKey": item["answerKey"],
        }
        for item in read_jsonl(dashskip_file)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def hellaswag_docs(dashskip_file: str, **metadata: Any) -> datasets.DatasetDict:
    """The preprocessed HellaSwag text file (6 lines per item) as rows of query, choices, label (a string, as on
    the hub), the validation split; the file's fields already had lm-eval's preprocessing applied."""
    rows = [
        {"query": query, "choices": endings, "label": str(label)}
        for query, endings, label in hellaswag_records(dashskip_file)
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def sst2_docs(dashskip_file: str, **metadata: Any) -> datasets.DatasetDict:
    """GLUE's SST-2 dev TSV (this copy's header says `text` where GLUE says `sentence`) as `nyu-mll/glue` rows."""
    rows = [{"sentence": r["text"], "label": int(r["label"]), "idx": i} for i, r in enumerate(read_tsv(dashskip_file))]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def rte_docs(dashskip_file: str, **metadata: Any) -> datasets.DatasetDict:
    """SuperGLUE's RTE validation JSONL (the same 277 pairs as GLUE's) as `nyu-mll/glue` rte rows
    (sentence1, sentence2, label 0 = entailment, 1 = not_entailment)."""
    rows = [
        {
            "sentence1": item["premise"],
            "sentence2": item["hypothesis"],
            "label": 0 if item["label"] == "entailment" else 1,
            "idx": item["idx"],
        }
        for item in read_jsonl(dashskip_file)
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


_ACC_AND_NORM = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_ARC = (
    """output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
"""
    + _ACC_AND_NORM
)

_HELLASWAG = (
    """output_type: multiple_choice
validation_split: validation
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
"""
    + _ACC_AND_NORM
)

_SST2 = """output_type: multiple_choice
validation_split: validation
doc_to_text: "{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

_RTE = """output_type: multiple_choice
validation_split: validation
doc_to_text: "{{sentence1}}\\nQuestion: {{sentence2}} True or False?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["True", "False"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

# task name -> (data file under the data root, custom dataset function, the stock task's body)
LOCAL_TASKS = {
    "dashskip_arc_easy": ("arc/ARC-Easy-Test.jsonl", "arc_docs", _ARC),
    "dashskip_arc_challenge": ("arc/ARC-Challenge-Test.jsonl", "arc_docs", _ARC),
    "dashskip_hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", "hellaswag_docs", _HELLASWAG),
    "dashskip_sst2": ("glue/sst2_dev.tsv", "sst2_docs", _SST2),
    "dashskip_rte": ("glue/rte_val.jsonl", "rte_docs", _RTE),
}


def local_tasks(data_dir: str | Path | None = None) -> Path:
    """Write the offline task configs (absolute data paths resolved now) and return their folder for --include_path.

    YAML cannot look for the data root itself, so the configs are generated: `data_dir`, else DASHSKIP_DATA, else
    ../shared/data (see `dashskip.data.data_roots`). A task whose file is missing is left out with a warning.
    """
    folder = cache_dir() / "lm_eval_tasks"
    missing = []
    for name, (relative, loader, body) in LOCAL_TASKS.items():
        target = folder / f"{name}.yaml"
        try:
            path = find_data_file(relative, data_dir)
        except DashskipError as exc:
            missing.append(str(exc))
            target.unlink(missing_ok=True)
            continue
        header = (
            f"task: {name}\n"
            f"custom_dataset: !function dashskip.eval.lmeval.{loader}\n"
            f"dataset_kwargs:\n  dashskip_file: {json.dumps(str(path.resolve()))}\n"
        )
        atomic_write_text(target, header + body)
    if len(missing) == len(LOCAL_TASKS):
        raise DashskipError("no data for any local lm-eval task: " + "; ".join(missing))
    for message in missing:
        log.warning("local lm-eval task left out: %s", message)
    return folder


def main(argv: list[str] | None = None) -> None:
    """`python -m dashskip.eval.lmeval ARGS`: lm-eval's command line with `--model dashskip` available and, unless
    --include_path is given, the local tasks included."""
    handler = logging.StreamHandler()  # lm-eval shows only its own loggers; the compute ratio goes to stderr too
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [dashskip] %(message)s", "%Y-%m-%d:%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--include_path" or arg.startswith("--include_path=") for arg in args):
        args += ["--include_path", str(local_tasks())]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
