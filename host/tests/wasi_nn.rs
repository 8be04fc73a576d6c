//! Both backends as guests will load them: through wasi-nn's `BackendInner`, run with an
//! execution context. A process of its own, since ONNX Runtime's library is loaded once per
//! process (from where `host/install-onnxruntime` puts it; `tests/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use modelyard::backend::onnxruntime;
use modelyard::backend::wasi_nn::WasiNnBackend;
use wasmtime_wasi_nn::Tensor;
use wasmtime_wasi_nn::backend::{BackendInner, Id};
use wasmtime_wasi_nn::wit::{ExecutionTarget, TensorType};

fn probabilities(backend: &mut dyn BackendInner, rows: u32) -> Vec<f32> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::fs::read(root.join("models/iris/2/model.onnx")).unwrap();
    let graph = backend.load(&[&model], ExecutionTarget::Cpu).unwrap();
    let mut context = graph.init_execution_context().unwrap();
    let data: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2]
        .repeat(rows as usize)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let input = Tensor::new(vec![rows, 4], TensorType::Fp32, data);
    context.set_input(Id::Index(0), &input).unwrap();
    context.compute().unwrap();
    let output = context
        .get_output(Id::Name("probabilities".into()))
        .unwrap();
    assert_eq!(output.dimensions, vec![rows, 3]);
    output
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn both_backends_load_and_run_through_the_wasi_nn_traits() {
    onnxruntime::configure(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/onnxruntime/libonnxruntime.so"),
    );
    for rows in [1, 3] {
        let on_tract = probabilities(&mut WasiNnBackend::tract(), rows);
        let on_ort = probabilities(&mut WasiNnBackend::onnxruntime(), rows);
        // A textbook setosa: the first class wins clearly, on both, to float rounding.
        assert!(on_ort[0] > 0.9, "{on_ort:?}");
        for (a, b) in on_tract.iter().zip(&on_ort) {
            assert!((a - b).abs() < 1e-5, "{on_tract:?} vs {on_ort:?}");
        }
    }
}
