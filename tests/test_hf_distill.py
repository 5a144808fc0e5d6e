"""fast/training/hf_distill.py: distillation of one transformers model into another from JSONL files, offline:
a byte-level BPE tokenizer trained here on a few kilobytes of text, tiny random Qwen2-shaped models saved
with save_pretrained. Every registry method runs; resume continues a killed run; bad input names its line."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fast.training import hf_distill  # noqa: E402
from fast.training.loop import read_log  # noqa: E402
from fast.training.methods import METHODS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = (
    "the cat sat on the mat. the dog ran to the park. a bird sang in the tree. "
    "two plus three is five. four minus one is three. the sun is hot and the snow is cold. "
) * 20
FACTS = [
    ("What does the cat do?", "the cat sat on the mat"),
    ("Where did the dog run?", "to the park"),
    ("What is two plus three?", "five"),
    ("Is the sun hot?", "the sun is hot"),
    ("What did the bird do?", "a bird sang in the tree"),
    ("What is four minus one?", "three"),
]


def _tokenizer(vocab_size=300, extra=()):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>", *extra],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([TEXT], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def _model(tok, hidden, seed):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    for name, hidden, seed in (("teacher", 32, 0), ("student", 16, 1)):
        _model(tok, hidden, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    for split, rows in (("train", FACTS * 3), ("valid", FACTS[:4])):
        with open(root / f"{split}.jsonl", "w") as f:
            for p, r in rows:
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return root


def _argv(d, out, method, *extra):
    return [
        "--teacher",
        str(d / "teacher"),
        "--student",
        str(d / "student"),
        "--train",
        str(d / "train.jsonl"),
        "--valid",
        str(d / "valid.jsonl"),
        "--method",
        method,
        "--out_dir",
        str(out),
        "--steps",
        "3",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "6",
        "--eval_every",
        "2",
        "--eval_examples",
        "4",
        "--block_size",
        "64",
        "--dac_k",
        "8",
        "--dac_hidden",
        "16",
        "--progress",
        "false",
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--init_threshold",
        "1.0",
        *extra,
    ]


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"mgsr-scrg0", "mgsr-forward_kl"}))
def test_every_method_runs_on_jsonl(dirs, tmp_path, method):
    hf_distill.main(_argv(dirs, tmp_path / "run", method))
    recs = read_log(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["method"] == method and 0.0 <= ev["greedy"]["rougeL"] <= 100.0 and ev["greedy"]["n"] == 4
    assert "val_rougeL" in recs[1]
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.hidden_size == 16


def test_final_evaluation_is_the_shared_scorer(dirs, tmp_path):
    # eval.json's ROUGE-L is fast.training.evaluate's on the saved student's greedy responses
    from fast.training.evaluate import generate_texts, score_texts

    hf_distill.main(_argv(dirs, tmp_path / "kd", "kd"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "kd" / "student")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "student").eval()
    pairs, refs = hf_distill.read_jsonl(str(dirs / "valid.jsonl"), tok, block_size=64)
    texts = generate_texts(
        model,
        [p for p, _ in pairs],
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=6,
    )
    ev = json.loads((tmp_path / "kd" / "eval.json").read_text())
    assert ev["greedy"] == score_texts(texts, refs)


def test_kill_and_resume_reproduces_the_run(dirs, tmp_path):
    extra = ("--ckpt_every", "1", "--grad_accum", "2", "--init_threshold", "0.5")
    hf_distill.main(_argv(dirs, tmp_path / "full", "mgsr", *extra))
    hf_distill.main(_argv(dirs, tmp_path / "cut", "mgsr", *extra, "--stop_after", "2"))
    hf_distill.main(_argv(dirs, tmp_path / "cut", "mgsr", *extra, "--resume", "1"))
    keys = ("step", "loss", "source", "val_loss")
    strip = lambda recs: [{k: r.get(k) for k in keys} for r in recs]  # noqa: E731
    assert strip(read_log(tmp_path / "cut")) == strip(read_log(tmp_path / "full"))
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "student").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_runs(dirs, tmp_path):
    hf_distill.main(_argv(dirs, tmp_path / "bf16", "kd", "--dtype", "bf16"))
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "student")
    assert student.dtype == torch.bfloat16


def test_chat_template_prompts(dirs):
    tok = transformers.AutoTokenizer.from_pretrained(dirs / "student")
    tok.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}\n{% endfor %}"
    pairs, _ = hf_distill.read_jsonl(str(dirs / "valid.jsonl"), tok, block_size=64, chat_template=True)
    plain, _ = hf_distill.read_jsonl(str(dirs / "valid.jsonl"), tok, block_size=64)
    assert pairs[0][0][0] == tok.bos_token_id and pairs[0][0] != plain[0][0] and pairs[0][1] == plain[0][1]


@pytest.mark.parametrize(
    "line,match",
    [
        ("[1, 2]", "line 2: expected an object with 'prompt' and 'response', got list"),
        ('{"prompt": "hi"}', "line 2: field 'response' is missing, not a string, or empty"),
        ('{"prompt": "", "response": "x"}', "line 2: field 'prompt' is missing, not a string, or empty"),
        ("{not json", "line 2: not valid JSON"),
        (json.dumps({"prompt": "the cat " * 40, "response": "x"}), "line 2: the prompt has \\d+ tokens"),
    ],
)
def test_bad_lines_are_named(dirs, tmp_path, line, match):
    tok = transformers.AutoTokenizer.from_pretrained(dirs / "student")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        hf_distill.read_jsonl(str(path), tok, block_size=32)


def test_mismatched_tokenizers_are_refused(dirs, tmp_path):
    other = _tokenizer(extra=("<extra>",))
    _model(other, 16, 1).save_pretrained(tmp_path / "student")
    other.save_pretrained(tmp_path / "student")
    argv = _argv(dirs, tmp_path / "run", "kd")
    argv[argv.index("--student") + 1] = str(tmp_path / "student")
    with pytest.raises(ValueError, match="teacher and student tokenizers differ"):
        hf_distill.main(argv)
