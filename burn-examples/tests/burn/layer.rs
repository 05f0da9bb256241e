//! The library's public Burn layer, `lightning_attention::burn::MiniMaxLinearAttention`:
//! its forward against an f64 reference of the whole layer (projections, SiLU,
//! the recurrence, RMS norm, gate), gradients reaching every parameter and
//! none reaching the slopes, and a record saved to a file and loaded into a
//! fresh layer.

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Device, Tensor, TensorData};
use lightning_attention::burn::{MiniMaxLinearAttention, MiniMaxLinearAttentionConfig};
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{self, Dims, relative_error};
use lightning_attention::slopes;

use super::training::rng_lock;
use super::{device, read};

/// Bound on `||y - ref|| / ||ref||` for the f32 layer.
const TOLERANCE: f64 = 1e-4;

const HIDDEN: usize = 32;
const HEADS: usize = 2;
const HEAD_DIM: usize = 16;

fn config(layer: usize, layers: usize) -> MiniMaxLinearAttentionConfig {
    // BLOCK 16: 37 tokens end mid-block, so every kernel's edge runs.
    MiniMaxLinearAttentionConfig::new(HIDDEN, HEADS, HEAD_DIM, layer, layers)
        .with_block(16)
        .with_sub_block(16)
}

fn input(batch: usize, seq: usize, seed: u64, device: &Device) -> (Vec<f64>, Tensor<3>) {
    let values: Vec<f32> = SeededRng::new(seed)
        .values(batch * seq * HIDDEN)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let x = Tensor::from_data(TensorData::new(values.clone(), [batch, seq, HIDDEN]), device);
    (values.into_iter().map(f64::from).collect(), x)
}

/// `x [rows, k] @ w [k, cols]` in f64.
fn matmul(x: &[f64], w: &[f64], k: usize, cols: usize) -> Vec<f64> {
    let rows = x.len() / k;
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for i in 0..k {
            let a = x[r * k + i];
            for c in 0..cols {
                out[r * cols + c] += a * w[i * cols + c];
            }
        }
    }
    out
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The layer in f64 from its parameters read back, following MiniMax's
/// modeling code as the layer's doc spells it out.
fn layer_reference(layer: &MiniMaxLinearAttention, x: &[f64], batch: usize, seq: usize) -> Vec<f64> {
    let (h, d) = (HEADS, HEAD_DIM);
    let inner = h * d;
    let qkv = matmul(x, &read(layer.qkv.weight.val()), HIDDEN, 3 * inner);
    // [b, n, h, 3d] -> q, k, v each [b, h, n, d] (the reference's layout).
    let dims = Dims {
        batch,
        heads: h,
        seq_len: seq,
        key_dim: d,
        value_dim: d,
    };
    let mut parts = [
        vec![0.0; dims.qk_len()],
        vec![0.0; dims.qk_len()],
        vec![0.0; dims.v_len()],
    ];
    for b in 0..batch {
        for t in 0..seq {
            for head in 0..h {
                for (which, part) in parts.iter_mut().enumerate() {
                    for c in 0..d {
                        let from = ((b * seq + t) * h + head) * 3 * d + which * d + c;
                        part[((b * h + head) * seq + t) * d + c] = silu(qkv[from]);
                    }
                }
            }
        }
    }
    let slope_values: Vec<f64> = read(layer.slopes.clone());
    let attention = reference::recurrence(dims, &parts[0], &parts[1], &parts[2], &slope_values, None);
    // [b, h, n, d] -> [b, n, h d], RMS norm over h d, times the gate.
    let gamma = read(layer.norm.gamma.val());
    let gate = matmul(x, &read(layer.gate.weight.val()), HIDDEN, inner);
    let mut gated = vec![0.0; batch * seq * inner];
    for b in 0..batch {
        for t in 0..seq {
            let row: Vec<f64> = (0..inner)
                .map(|i| attention.out[((b * h + i / d) * seq + t) * d + i % d])
                .collect();
            let mean_square = row.iter().map(|v| v * v).sum::<f64>() / inner as f64;
            let scale = 1.0 / (mean_square + layer.norm.epsilon).sqrt();
            for i in 0..inner {
                let at = (b * seq + t) * inner + i;
                gated[at] = sigmoid(gate[at]) * row[i] * scale * gamma[i];
            }
        }
    }
    matmul(&gated, &read(layer.out.weight.val()), inner, HIDDEN)
}

#[test]
fn layer_forward_matches_reference() {
    let _rng = rng_lock();
    let device = device();
    // The last layer of 3: MiniMax's weakest decay.
    let layer = config(2, 3).init(&device).expect("a valid config");
    let expected_slopes = slopes::layer_slopes(HEADS, 2, 3).expect("valid slopes");
    let got_slopes: Vec<f32> = read(layer.slopes.clone()).into_iter().map(|x| x as f32).collect();
    assert_eq!(got_slopes, expected_slopes, "the layer's slopes are MiniMax's");

    let (batch, seq) = (2, 37);
    let (x_values, x) = input(batch, seq, 11, &device);
    let y = layer.forward(x).expect("valid input");
    assert_eq!(y.dims(), [batch, seq, HIDDEN]);
    let expected = layer_reference(&layer, &x_values, batch, seq);
    let err = relative_error(&read(y), &expected);
    assert!(err < TOLERANCE, "layer vs f64 reference: relative error {err:e}");
}

#[test]
fn layer_gradients_reach_every_parameter_and_not_the_slopes() {
    let _rng = rng_lock();
    let device = device().autodiff();
    let layer = config(0, 2).init(&device).expect("a valid config");
    let (_, x) = input(1, 21, 12, &device);
    let x = x.require_grad();
    let (y, state) = layer.forward_with_state(x.clone(), None).expect("valid input");
    // A loss through both results: the output and the carried state.
    let loss = y.powf_scalar(2.0).sum() + state.sum();
    let grads = loss.backward();
    let parameters = [
        ("qkv", layer.qkv.weight.val()),
        ("gate", layer.gate.weight.val()),
        ("out", layer.out.weight.val()),
    ];
    for (name, weight) in parameters {
        let grad = read(
            weight
                .grad(&grads)
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        let norm: f64 = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm.is_finite() && norm > 0.0, "{name}: gradient norm {norm}");
    }
    let gamma = read(layer.norm.gamma.val().grad(&grads).expect("norm: a gradient"));
    assert!(gamma.iter().all(|g| g.is_finite()) && gamma.iter().any(|&g| g != 0.0));
    let dx = read(x.grad(&grads).expect("x: a gradient"));
    assert!(dx.iter().all(|g| g.is_finite()) && dx.iter().any(|&g| g != 0.0));
    // The slopes are a constant: no gradient, and not a parameter of the record.
    assert!(layer.slopes.grad(&grads).is_none(), "slopes got a gradient");
}

#[test]
fn layer_record_round_trips_through_a_file() {
    let _rng = rng_lock();
    let device = device();
    let trained = config(1, 4).init(&device).expect("a valid config");
    let path = std::env::temp_dir().join(format!("minimax-layer-{}.bpk", std::process::id()));
    trained.clone().save_file(&path).expect("record saved");
    // A fresh layer draws other weights; loading the record makes it the first.
    let fresh = config(1, 4).init(&device).expect("a valid config");
    let (_, x) = input(1, 19, 13, &device);
    let before = read(fresh.forward(x.clone()).expect("valid input"));
    let record = ModuleRecord::load(&path).expect("record read");
    let loaded = fresh.try_load_record(record).expect("record applies");
    let expected = read(trained.forward(x.clone()).expect("valid input"));
    let got = read(loaded.forward(x).expect("valid input"));
    // Only now: the record's bytes are read from the file lazily, when the
    // loaded tensors are first used.
    let _ = std::fs::remove_file(&path);
    assert_eq!(got, expected, "the loaded layer computes what the saved one did");
    assert_ne!(before, expected, "a fresh layer differs before loading");
    assert_eq!(read(loaded.slopes.clone()), read(trained.slopes.clone()));
}

/// The layer on a packed batch (`forward_packed`, issue 29) equals the layer
/// on each document alone, concatenated: outputs, final states from given
/// states, and the gradients of every parameter. Padding rows are zeros
/// (the norm of a zero attention output is zero, and no layer has a bias).
#[test]
fn layer_on_packed_batch_equals_layer_per_document() {
    let _rng = rng_lock();
    let device = device().autodiff();
    let layer = config(1, 3).init(&device).expect("a valid config");
    // BLOCK 16: a document within a block, one of exactly a block, one token, several blocks.
    let lengths = [7usize, 16, 1, 21];
    let padding = 2;
    let mut cu = vec![0u32];
    for len in lengths {
        cu.push(cu.last().unwrap() + len as u32);
    }
    let tokens = *cu.last().unwrap() as usize + padding;
    let (x_values, x) = input(1, tokens, 14, &device);
    let docs = lengths.len();
    let states_shape = [docs, HEADS, HEAD_DIM, HEAD_DIM];
    let state_len = HEADS * HEAD_DIM * HEAD_DIM;
    let state_values: Vec<f32> = SeededRng::new(15)
        .values(docs * state_len)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let states = Tensor::<4>::from_data(TensorData::new(state_values.clone(), states_shape), &device);
    let weights: Vec<f32> = SeededRng::new(16)
        .values(tokens * HIDDEN)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let weight = |rows: std::ops::Range<usize>| {
        let data = weights[rows.start * HIDDEN..rows.end * HIDDEN].to_vec();
        Tensor::<3>::from_data(TensorData::new(data, [1, rows.len(), HIDDEN]), &device)
    };
    let parameters = |layer: &MiniMaxLinearAttention| {
        [
            layer.qkv.weight.val(),
            layer.gate.weight.val(),
            layer.out.weight.val(),
        ]
    };

    // Packed, from zero states and from given ones.
    let y = layer
        .forward_packed(x.clone(), &cu)
        .expect("a valid packed batch");
    assert_eq!(y.dims(), [1, tokens, HIDDEN]);
    let (y_states, finals) = layer
        .forward_packed_with_states(x.clone(), &cu, Some(states.clone()))
        .expect("a valid packed batch");
    assert_eq!(finals.dims(), states_shape);
    let loss = (y_states.clone() * weight(0..tokens)).sum() + finals.clone().sum();
    let grads = loss.backward();
    let packed_grads: Vec<Vec<f64>> = parameters(&layer)
        .iter()
        .map(|w| read(w.grad(&grads).expect("a gradient")))
        .collect();
    let (y, y_states, finals) = (read(y), read(y_states), read(finals));

    // Each document alone, its gradients summed over the documents.
    let mut expected_y = Vec::new();
    let mut expected_y_states = Vec::new();
    let mut expected_finals = Vec::new();
    let mut summed: Vec<Vec<f64>> = packed_grads.iter().map(|g| vec![0.0; g.len()]).collect();
    for doc in 0..docs {
        let rows = cu[doc] as usize..cu[doc + 1] as usize;
        let data: Vec<f32> = x_values[rows.start * HIDDEN..rows.end * HIDDEN]
            .iter()
            .map(|&x| x as f32)
            .collect();
        let x_doc = Tensor::<3>::from_data(TensorData::new(data, [1, rows.len(), HIDDEN]), &device);
        expected_y.extend(read(layer.forward(x_doc.clone()).expect("a valid document")));
        let state = state_values[doc * state_len..(doc + 1) * state_len].to_vec();
        let state = Tensor::<4>::from_data(TensorData::new(state, [1, HEADS, HEAD_DIM, HEAD_DIM]), &device);
        let (y_doc, final_doc) = layer
            .forward_with_state(x_doc, Some(state))
            .expect("a valid document");
        let loss = (y_doc.clone() * weight(rows)).sum() + final_doc.clone().sum();
        let grads = loss.backward();
        for (sum, w) in summed.iter_mut().zip(parameters(&layer)) {
            for (s, g) in sum.iter_mut().zip(read(w.grad(&grads).expect("a gradient"))) {
                *s += g;
            }
        }
        expected_y_states.extend(read(y_doc));
        expected_finals.extend(read(final_doc));
    }
    let pad = padding * HIDDEN;
    for (what, got, expected) in [
        ("y", &y, &expected_y),
        ("y from states", &y_states, &expected_y_states),
    ] {
        let (rows, tail) = got.split_at(got.len() - pad);
        let err = relative_error(rows, expected);
        assert!(
            err < TOLERANCE,
            "{what}: packed vs per document, relative error {err:e}"
        );
        assert!(tail.iter().all(|&v| v == 0.0), "{what}: padding rows not zero");
    }
    let err = relative_error(&finals, &expected_finals);
    assert!(err < TOLERANCE, "final states: relative error {err:e}");
    for (name, (got, expected)) in ["qkv", "gate", "out"]
        .iter()
        .zip(packed_grads.iter().zip(&summed))
    {
        let err = relative_error(got, expected);
        assert!(
            err < TOLERANCE,
            "{name} gradient: packed vs per document, relative error {err:e}"
        );
    }
}

/// The packed forward's typed errors, in the layer's terms.
#[test]
fn layer_packed_errors_are_typed() {
    let _rng = rng_lock();
    let device = device();
    let layer = config(0, 2).init(&device).expect("a valid config");
    let (_, x) = input(1, 12, 17, &device);
    let err = layer
        .forward_packed(x.clone(), &[0, 8, 5, 12])
        .expect_err("decreasing");
    assert!(
        matches!(
            err,
            lightning_attention::LightningError::OffsetsDecreasing { index: 2, .. }
        ),
        "{err}"
    );
    let err = layer.forward_packed(x.clone(), &[0, 13]).expect_err("past T");
    assert!(
        matches!(err, lightning_attention::LightningError::OffsetPastEnd { .. }),
        "{err}"
    );
    let states = Tensor::<4>::zeros([3, HEADS, HEAD_DIM, HEAD_DIM], &device);
    let err = layer
        .forward_packed_with_states(x.clone(), &[0, 5, 12], Some(states))
        .expect_err("states of 3 documents");
    assert_eq!(
        err,
        lightning_attention::LightningError::Shape {
            tensor: "states",
            expected: vec![2, HEADS, HEAD_DIM, HEAD_DIM],
            layout: "[N, h, d, d]",
            actual: vec![3, HEADS, HEAD_DIM, HEAD_DIM],
        }
    );
    let (_, two_rows) = input(2, 6, 18, &device);
    let err = layer.forward_packed(two_rows, &[0, 6]).expect_err("two rows");
    assert!(
        matches!(
            err,
            lightning_attention::LightningError::Shape { tensor: "x", .. }
        ),
        "{err}"
    );
}
