"""The exported ONNX file: one self-contained file, a dynamic batch axis, and the same logits
as PyTorch, from either torch exporter and with TTA in the graph."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from cifarlab.export import (
    EXPORTERS,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    export_onnx,
    onnx_session,
    servable,
)
from models import build_model


def _with_statistics(m: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that a graph that dropped them would be caught."""
    torch.manual_seed(0)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(64, 3, 32, 32) * 2 + 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _with_statistics(build_model("seed-baseline"))


@pytest.fixture(scope="module")
def models(model):
    """The report's net and the fast recipe's (narrow, to stay quick; the same layers)."""
    return {
        "seed-baseline": model,
        "fast": _with_statistics(build_model("fast", widths=(16, 32, 32))),
    }


@pytest.mark.parametrize(
    "name,tta", [("seed-baseline", "none"), ("seed-baseline", "flip_translate"), ("fast", "none")]
)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_answers_any_batch_size_like_pytorch(models, tmp_path, exporter, name, tta):
    model = models[name]
    path = export_onnx(model, tmp_path / "model.onnx", tta=tta, exporter=exporter)

    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no side file of weights
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    for value in (inp, out):  # the batch axis is named, not fixed
        batch_dim = value.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), value
    session = onnx_session(path)
    reference = servable(model, tta)
    x = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for n in (1, 3, 300):
        (logits,) = session.run(None, {INPUT_NAME: x[:n].numpy()})
        with torch.no_grad():
            expected = reference(x[:n]).numpy()
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name,tta", [("seed-baseline", "flip_translate"), ("fast", "none")])
def test_the_parity_check_passes_the_export_and_names_a_wrong_file(
    models, tmp_path, name, tta, channels_last
):
    """check_parity (PyTorch in the run's layout against onnxruntime) passes a faithful file
    with its TTA, and a file of other weights fails it, the numbers named."""
    from cifarlab.export import ParityError, check_parity, require_parity

    model = models[name]
    images = torch.randint(
        0, 256, (600, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    good = export_onnx(model, tmp_path / "good.onnx", tta=tta)
    report = check_parity(model, good, images, tta=tta, channels_last=channels_last)
    assert report.images == 600 and report.passed, report
    require_parity(report)
    assert next(model.parameters()).is_contiguous()  # the model itself is left as it was
    other = copy.deepcopy(model)
    with torch.no_grad():  # other weights, the same graph
        for p in other.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    wrong = export_onnx(other, tmp_path / "wrong.onnx", tta=tta)
    report = check_parity(model, wrong, images, tta=tta, channels_last=channels_last)
    assert not report.passed and report.max_abs_diff > 1e-2
    with pytest.raises(ParityError, match="differs from PyTorch on 600 images"):
        require_parity(report)


def test_an_unknown_exporter_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="exporter='onnxmltools'"):
        export_onnx(model, tmp_path / "model.onnx", exporter="onnxmltools")


def test_a_set_normalised_once_scores_as_its_uint8_images(model, tmp_path):
    """The served file and its int8 twin are run on the same sets, normalised once
    (`model_input`): the file must score them exactly as it scores the uint8 images."""
    from cifarlab.export import evaluate_onnx, model_input
    from cifarlab.tensors import normalize

    path = export_onnx(model, tmp_path / "model.onnx")
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (2500,), generator=g)
    x = model_input(images)
    assert x.dtype == np.float32 and x.shape == (2500, 3, 32, 32)
    np.testing.assert_array_equal(
        x[1000:1010], normalize(images[1000:1010], torch.device("cpu")).numpy()
    )
    direct, once = evaluate_onnx(path, images, labels), evaluate_onnx(path, x, labels)
    np.testing.assert_array_equal(once.predictions, direct.predictions)
    np.testing.assert_array_equal(once.confusion, direct.confusion)
    assert once.loss == pytest.approx(direct.loss, abs=1e-6)


def test_an_array_that_is_not_the_models_input_is_refused(model, tmp_path):
    from cifarlab.export import evaluate_onnx

    path = export_onnx(model, tmp_path / "model.onnx")
    uint8 = np.zeros((4, 3, 32, 32), np.uint8)  # pixels, not normalised: would score wrong
    with pytest.raises(ValueError, match=r"float32 \(N, 3, 32, 32\).*got uint8"):
        evaluate_onnx(path, uint8, torch.zeros(4, dtype=torch.long))


def test_a_session_per_core_scores_each_set_as_one_session_does(model, tmp_path):
    """The int8 twin's validation and test sets may run on a single-threaded session per core
    taking their batches in turn: each set must get exactly its own result, in the order given
    (here with 3 workers, whatever this machine's cores), and a set that is not the model's
    input is refused."""
    from cifarlab.export import evaluate_onnx, evaluate_onnx_per_core, model_input

    path = export_onnx(model, tmp_path / "model.onnx")
    g = torch.Generator().manual_seed(3)
    sets = []
    for n in (2500, 700, 0, 1):  # unequal sizes, several batches, an empty set
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        sets.append((model_input(images), torch.randint(0, 10, (n,), generator=g)))
    per_core = evaluate_onnx_per_core(path, sets, workers=3)
    assert [len(r.predictions) for r in per_core] == [2500, 700, 0, 1]
    for (x, y), got in zip(sets, per_core):
        if not len(y):
            continue
        alone = evaluate_onnx(path, x, y)
        np.testing.assert_array_equal(got.predictions, alone.predictions)
        np.testing.assert_array_equal(got.confusion, alone.confusion)
        assert got.loss == pytest.approx(alone.loss, abs=1e-6)
    with pytest.raises(ValueError, match="got uint8"):
        evaluate_onnx_per_core(
            path, [sets[0], (np.zeros((2, 3, 32, 32), np.uint8), sets[0][1][:2])]
        )


def test_int8_dot_product_is_read_from_the_cpu_flags(tmp_path):
    """The CPU's int8 dot-product instructions, read from its flags (the int8 twin's
    evaluation and the service's int8 rule follow them); None where the CPU does not say."""
    from cifarlab.cpu import has_int8_dot_product

    def cpuinfo(text: str):
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(text)
        return path

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
    assert not has_int8_dot_product(cpuinfo(avx2))
    assert has_int8_dot_product(cpuinfo(avx2.replace("fma", "fma avx512_vnni")))
    assert has_int8_dot_product(cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\n"))
    assert has_int8_dot_product(cpuinfo("processor\t: 0\n")) is None  # no flags: cannot tell
    assert has_int8_dot_product(tmp_path / "missing") is None


@pytest.mark.parametrize("dot_product,bits", [(True, 8), (False, 7), (None, 7)])
def test_the_int8_twin_gets_7_bit_weights_where_int8_sums_could_saturate(
    model, tmp_path, monkeypatch, dot_product, bits
):
    """Without int8 dot-product instructions (or where the CPU does not say) the twin's
    weights stay within +-64, so onnxruntime's 16-bit sums of pairs cannot saturate; with
    them the full 8 bits are used."""
    from onnx import numpy_helper

    from cifarlab import quantize
    from cifarlab.evaluate import score
    from cifarlab.export import model_input, onnx_logits

    monkeypatch.setattr(quantize, "has_int8_dot_product", lambda: dot_product)
    path = export_onnx(model, tmp_path / "model.onnx")
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    x = model_input(images)
    fp32_val = score(torch.from_numpy(onnx_logits(path, x)), labels)
    report = quantize.build_int8(
        path, fp32_val, x[:128], x, labels, x, labels, tmp_path / "model_int8.onnx"
    )
    assert (report.weight_bits, report.judged_with_dot_product) == (bits, dot_product)
    weights = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(report.path)).graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 100
    ]
    assert weights  # the conv and dense weights
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest <= 64 if bits == 7 else largest > 64, largest
