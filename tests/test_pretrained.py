"""qm.save_pretrained / qgraph.from_pretrained: trainable state only, bit-exact round trips, atomic
writes, and clear errors (raised before the model is touched) for every way a save can fail to fit."""

import hashlib
import json
import os
import shutil
import warnings

import pytest
import safetensors.torch
import torch

import qgraph
from qgraph import saved_state
from qgraph.errors import PretrainedError, QGraphError
from qgraph.fingerprint import weights_digest
from qgraph.saved_state import CONFIG_FILE, trainable_tensors
from tests.conftest import make_gpt2, make_llama, random_ids

# each plan with an option overridden, so the save must carry the options as they ran
PLANS = {"lrqat-w4": {"rank": 8}, "qst-nf4": {"r": 4, "downsample": "lora"}, "peqa-w4": {}}
IDS = random_ids((2, 12), seed=1)


def train(qm, steps=3):
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=1e-2)
    ids = random_ids((2, 16), seed=0)
    for _ in range(steps):
        qm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return qm


def logits(qm, ids):
    qm.eval()
    with torch.no_grad():
        return qm(input_ids=ids).logits


def tensor_file(directory):
    [path] = directory.glob("trainable-*.safetensors")
    return path


@pytest.fixture(scope="module", params=list(PLANS))
def saved(request, tmp_path_factory):
    """(plan, trained module, its save directory, its logits before training) per plan."""
    plan = request.param
    qm = qgraph.transform(make_llama(), plan, **PLANS[plan])
    untrained = logits(qm, IDS)
    train(qm.train())
    directory = qm.save_pretrained(tmp_path_factory.mktemp(plan))
    return plan, qm, directory, untrained


@pytest.fixture(scope="module")
def lrqat_saved(tmp_path_factory):
    qm = train(qgraph.transform(make_llama(), "lrqat-w4", rank=8))
    return qm, qm.save_pretrained(tmp_path_factory.mktemp("lrqat"))


def assert_state_unchanged(qm, before):
    """For a transformed module (the conftest snapshot refuses the hooks torch.export's module carries)."""
    now = qm.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(now[name], tensor) for name, tensor in before.items())


def state_of(qm):
    return {name: tensor.detach().clone() for name, tensor in qm.state_dict().items()}


@pytest.fixture(scope="module")
def lrqat_target():
    """A module transformed as lrqat_saved's was, for loads that must fail and leave it as it is."""
    return qgraph.transform(make_llama(), "lrqat-w4", rank=8)


@pytest.fixture
def copy_of(tmp_path):
    """A copy of a save directory that a test may damage."""
    def copy(directory):
        return shutil.copytree(directory, tmp_path / "copy")
    return copy


def test_round_trip_through_the_base_model_is_bit_exact(saved):
    _, qm, directory, untrained = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "frozen tensors differ" warning either
        loaded = qgraph.from_pretrained(make_llama(), directory)
    assert isinstance(loaded, qgraph.HFQGraphModule) and loaded is not qm
    saved_tensors, loaded_tensors = trainable_tensors(qm), trainable_tensors(loaded)
    assert saved_tensors.keys() == loaded_tensors.keys()
    for name, tensor in saved_tensors.items():
        assert torch.equal(tensor, loaded_tensors[name]), name
    assert torch.equal(logits(loaded, IDS), logits(qm, IDS))
    assert not torch.equal(untrained, logits(loaded, IDS))  # it did train, and that was loaded


def test_writes_a_small_json_and_one_file_of_the_trainable_tensors(saved):
    plan, qm, directory, _ = saved
    path = tensor_file(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, path.name])
    trainable = {name for name, p in qm.graph_module.named_parameters() if p.requires_grad}
    assert set(safetensors.torch.load_file(path)) == trainable  # graph-module names, trainable only
    trainable_bytes = sum(p.numel() * p.element_size() for p in qm.trainable_parameters())
    assert trainable_bytes < path.stat().st_size < trainable_bytes + 16 * 1024
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert (directory / CONFIG_FILE).stat().st_size < 16 * 1024
    assert meta["format"] == 1 and meta["plan"]["name"] == plan
    assert meta["options"] == {f"{name}.{key}": value for name, key, value in
                               [("lrqat" if plan != "qst-nf4" else "attach_side_taps", k, v)
                                for k, v in PLANS[plan].items()]}
    assert meta["base_model"]["class"] == "LlamaForCausalLM"
    assert meta["base_model"]["config"]["hidden_size"] == 64


def test_loads_in_place_into_a_module_transformed_with_the_same_plan(saved):
    plan, qm, directory, _ = saved
    fresh = qgraph.transform(make_llama(), plan, **PLANS[plan])
    parameters = list(fresh.trainable_parameters())
    assert qgraph.from_pretrained(fresh, directory) is fresh
    assert all(a is b for a, b in zip(parameters, fresh.trainable_parameters()))  # an optimizer's stay valid
    ids = random_ids((2, 12), seed=2)
    assert torch.equal(logits(fresh, ids), logits(qm, ids))


def test_in_place_refuses_a_module_of_other_plan_options(lrqat_saved):
    _, directory = lrqat_saved
    other = qgraph.transform(make_llama(), "lrqat-w4", rank=4)
    before = state_of(other)
    with pytest.raises(PretrainedError, match=r"lrqat.rank: saved 8, this module 4.*qgraph.from_pretrained\(model"):
        qgraph.from_pretrained(other, directory)
    assert_state_unchanged(other, before)
    with pytest.raises(PretrainedError, match=r"passes: saved \['lrqat', 'insert_checkpoints'"):
        qgraph.from_pretrained(qgraph.transform(make_llama(), "nf4"), directory)


@pytest.mark.parametrize("base, message", [
    (lambda: make_gpt2(), r"trained on a LlamaForCausalLM; this model is a GPT2LMHeadModel"),
    (lambda: make_llama(layers=3), r"another config \(num_hidden_layers: saved 2, this model 3\)"),
    (lambda: make_llama(seed=1), r"with other weights \(same config and shapes, weights digest sha256:"),
])
def test_refuses_another_base_model_and_leaves_it_untouched(lrqat_saved, snapshot, base, message):
    _, directory = lrqat_saved
    model = base()
    before = snapshot(model)
    with pytest.raises(PretrainedError, match=message):
        qgraph.from_pretrained(model, directory)
    before.assert_unchanged(model)


def test_weights_digest_sees_one_changed_sampled_element():
    model = make_llama()
    digest = weights_digest(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-6  # a 64-element tensor: every element is read
    assert weights_digest(model) != digest


def damage_missing_json(directory):
    (directory / CONFIG_FILE).unlink()


def damage_missing_tensors(directory):
    tensor_file(directory).unlink()


def damage_truncated_tensors(directory):
    path = tensor_file(directory)
    path.write_bytes(path.read_bytes()[:-100])


def damage_corrupt_tensors(directory):
    path = tensor_file(directory)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_truncated_json(directory):
    path = directory / CONFIG_FILE
    path.write_text(path.read_text()[:200])


def edit_meta(directory, change):
    path = directory / CONFIG_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def rewrite_tensors(directory, change):
    """Replace the tensor file with `change(tensors)`, its size and sha256 updated: a consistent save."""
    path = tensor_file(directory)
    tensors = change(safetensors.torch.load_file(path))
    data = safetensors.torch.save(tensors)
    path.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    edit_meta(directory, lambda meta: meta["trainable"].update(bytes=len(data), sha256=sha256))


def drop_first_tensor(tensors):
    tensors.pop(sorted(tensors)[0])
    return tensors


def reshape_first_tensor(tensors):
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 5)
    return tensors


def add_a_tensor(tensors):
    return tensors | {"model.extra": torch.zeros(2)}


DAMAGES = {
    "missing json": (damage_missing_json, rf"holds no {CONFIG_FILE}: it is not a qgraph save.*save_pretrained"),
    "missing tensors": (damage_missing_tensors, r"trainable-[0-9a-f]+\.safetensors is missing"),
    "truncated tensors": (damage_truncated_tensors, r"trainable-[0-9a-f]+\.safetensors is truncated: \d+ bytes"),
    "corrupt tensors": (damage_corrupt_tensors, r"trainable-[0-9a-f]+\.safetensors is corrupt: its sha256 differs"),
    "truncated json": (damage_truncated_json, rf"{CONFIG_FILE} is not valid JSON .*truncated or corrupt"),
    "newer format": (lambda d: edit_meta(d, lambda m: m.update(format=2)),
                     r"has format 2, written by a newer qgraph.*reads format 1: upgrade qgraph"),
    "unknown format": (lambda d: edit_meta(d, lambda m: m.update(format="x")), r"has format 'x'; this qgraph reads"),
    "tensor missing": (lambda d: rewrite_tensors(d, drop_first_tensor), r"lacks 1 trainable tensor\(s\).*first 'model"),
    "tensor of another shape": (lambda d: rewrite_tensors(d, reshape_first_tensor),
                                r"tensor 'model\.\S+' is torch.float32 \(3, 5\) in the file, "
                                r"torch.float32 \(\d+, \d+\)"),
    "extra tensor": (lambda d: rewrite_tensors(d, add_a_tensor), r"holds 1 tensor\(s\) this module does not train"),
    "bytes edited to text": (lambda d: edit_meta(d, lambda m: m["trainable"].update(bytes="abc")),
                             r"holds trainable.bytes of another type .* edited or is corrupt"),
    "config edited to text": (lambda d: edit_meta(d, lambda m: m["base_model"].update(config="abc")),
                              r"holds base_model.config of another type"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("into", ["base model", "transformed module"])
def test_a_damaged_save_is_an_error_naming_the_file_and_the_model_is_untouched(lrqat_saved, lrqat_target, copy_of,
                                                                             snapshot, damage, into):
    qm, directory = lrqat_saved
    directory = copy_of(directory)
    change, message = DAMAGES[damage]
    change(directory)
    if into == "base model":
        target = make_llama()
        before = snapshot(target)
        with pytest.raises(PretrainedError, match=message):
            qgraph.from_pretrained(target, directory)
        before.assert_unchanged(target)
    else:
        target = lrqat_target
        before = state_of(target)
        with pytest.raises(PretrainedError, match=message):
            qgraph.from_pretrained(target, directory)
        assert_state_unchanged(target, before)


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(PretrainedError, match=r"nowhere does not exist: it is not a qgraph save"):
        qgraph.from_pretrained(make_llama(), tmp_path / "nowhere")


def test_other_frozen_tensors_after_the_plan_warn(lrqat_saved, copy_of):
    _, directory = lrqat_saved
    directory = copy_of(directory)
    edit_meta(directory, lambda meta: meta.update(frozen_digest="sha256:0"))
    with pytest.warns(UserWarning, match="made other frozen tensors.*not equal to it bit for bit"):
        qgraph.from_pretrained(make_llama(), directory)


def test_a_save_interrupted_before_its_commit_leaves_the_previous_save(tmp_path, monkeypatch):
    qm = train(qgraph.transform(make_llama(), "lrqat-w4", rank=8), steps=1)
    directory = qm.save_pretrained(tmp_path / "run")
    previous = {name: t.detach().clone() for name, t in trainable_tensors(qm).items()}
    train(qm, steps=1)  # the module moves on; a second save starts and dies before the JSON is replaced
    replace = os.replace

    def dies_at_the_commit(source, destination):
        if str(destination).endswith(CONFIG_FILE):
            raise KeyboardInterrupt("killed")
        replace(source, destination)

    monkeypatch.setattr(saved_state.os, "replace", dies_at_the_commit)
    with pytest.raises(KeyboardInterrupt):
        qm.save_pretrained(directory)
    monkeypatch.setattr(saved_state.os, "replace", replace)
    assert not list(directory.glob(".*.tmp"))  # the half-written JSON went with it
    loaded = trainable_tensors(qgraph.from_pretrained(make_llama(), directory))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in previous.items())

    qm.save_pretrained(directory)  # the next save completes and removes the orphaned tensor file
    assert len(list(directory.glob("trainable-*.safetensors"))) == 1
    loaded = trainable_tensors(qgraph.from_pretrained(make_llama(), directory))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in trainable_tensors(qm).items())
    assert not all(torch.equal(loaded[name], tensor) for name, tensor in previous.items())


def test_a_module_with_nothing_trained_is_refused_before_anything_is_written(lrqat_saved, tmp_path):
    qm, _ = lrqat_saved
    for module in (qgraph.transform(make_llama(), "nf4"), qgraph.finalize(qm)):
        with pytest.raises(PretrainedError, match=r"left nothing trainable.*before finalize"):
            module.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(QGraphError, match="it is a file; name a directory"):
        qm.save_pretrained(tmp_path / "file")


@pytest.mark.parametrize("call", ["save None", "save 3", "load None", "load bytes", "load a string model"])
def test_path_and_model_arguments_of_another_type_are_named(lrqat_saved, call):
    qm, directory = lrqat_saved
    calls = {
        "save None": (lambda: qm.save_pretrained(None), "save_pretrained takes a directory path"),
        "save 3": (lambda: qm.save_pretrained(3), "save_pretrained takes a directory path"),
        "load None": (lambda: qgraph.from_pretrained(make_llama(), None), "from_pretrained takes a directory path"),
        "load bytes": (lambda: qgraph.from_pretrained(make_llama(), bytes(directory)),
                       "from_pretrained takes a directory path"),
        "load a string model": (lambda: qgraph.from_pretrained("tiny-llama", directory),
                                "from_pretrained takes the base model .* got str"),
    }
    run, message = calls[call]
    with pytest.raises(TypeError, match=message):
        run()


def test_saving_under_a_file_names_the_file(lrqat_saved, tmp_path):
    qm, _ = lrqat_saved
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PretrainedError, match=r"cannot save into .*a-file/sub/run: .*a-file is a file"):
        qm.save_pretrained(tmp_path / "a-file" / "sub" / "run")


def test_loading_in_place_refuses_compile_and_example_inputs_it_cannot_apply(lrqat_saved, lrqat_target):
    _, directory = lrqat_saved
    before = state_of(lrqat_target)
    for kwargs in ({"compile": True}, {"example_inputs": IDS}):
        with pytest.raises(qgraph.QGraphError, match="this module was transformed already"):
            qgraph.from_pretrained(lrqat_target, directory, **kwargs)
    with pytest.raises(qgraph.QGraphError, match="compile must be False, True"):
        qgraph.from_pretrained(lrqat_target, directory, compile="yes")
    assert_state_unchanged(lrqat_target, before)


def test_a_base_model_on_the_meta_device_is_named_as_such(lrqat_saved):
    _, directory = lrqat_saved
    with torch.device("meta"):
        model = make_llama()
    with pytest.raises(qgraph.QGraphError, match="on the meta device"):
        qgraph.from_pretrained(model, directory)
