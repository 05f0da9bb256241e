//! `fla_lightning_attention_packed` (issue 29): documents packed into one
//! `[1, T, H, *]` row with `cu_seqlens`. Its output, final states and
//! gradients (q, k, v, initial states) equal those of the same documents run
//! one by one through `fla_lightning_attention` and concatenated; rows past
//! the last document are zeros; bad `cu_seqlens` and states come back as
//! typed errors in the caller's layout. On the plain device and under
//! autodiff, and on Fusion when the feature `fusion` is on.

use burn::tensor::{Device, Tensor};
use lightning_attention::burn::{fla_lightning_attention, fla_lightning_attention_packed};
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{self, Dims};
use lightning_attention::{LightningError, PrefillConfig};

use super::{check, device, read, slopes, tensor, values};

const HEADS: usize = 2;
const KEY_DIM: usize = 16;
const VALUE_DIM: usize = 8;

/// Document lengths at BLOCK 16: within a block, exactly a block, one token,
/// an empty document, several blocks ending mid-block.
const LENGTHS: [usize; 6] = [5, 16, 1, 0, 37, 9];
/// Rows of padding past the last document.
const PADDING: usize = 3;

fn config() -> PrefillConfig {
    PrefillConfig::new(16, 16)
}

/// `N + 1` offsets of `lengths`.
fn offsets(lengths: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for &len in lengths {
        cu.push(cu.last().unwrap() + len as u32);
    }
    cu
}

/// A packed problem: `[T, H, *]` data (batch row 1), one initial state per
/// document, and the loss weights of the output and the final states.
struct Packed {
    cu: Vec<u32>,
    tokens: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    initial: Vec<f64>,
    w_out: Vec<f64>,
    w_final: Vec<f64>,
}

const STATE: usize = HEADS * KEY_DIM * VALUE_DIM;

fn packed_problem(lengths: &[usize], seed: u64) -> Packed {
    let cu = offsets(lengths);
    let tokens = *cu.last().unwrap() as usize + PADDING;
    let docs = lengths.len();
    let mut rng = SeededRng::new(seed);
    Packed {
        tokens,
        q: values(&mut rng, tokens * HEADS * KEY_DIM),
        k: values(&mut rng, tokens * HEADS * KEY_DIM),
        v: values(&mut rng, tokens * HEADS * VALUE_DIM),
        initial: values(&mut rng, docs * STATE),
        w_out: values(&mut rng, tokens * HEADS * VALUE_DIM),
        w_final: values(&mut rng, docs * STATE),
        cu,
    }
}

impl Packed {
    fn docs(&self) -> usize {
        self.cu.len() - 1
    }

    /// Rows `cu[i]..cu[i + 1]` of a `[T, H, width]` array.
    fn rows<'a>(&self, data: &'a [f64], doc: usize, width: usize) -> &'a [f64] {
        let row = HEADS * width;
        &data[self.cu[doc] as usize * row..self.cu[doc + 1] as usize * row]
    }

    fn state<'a>(&self, data: &'a [f64], doc: usize) -> &'a [f64] {
        &data[doc * STATE..(doc + 1) * STATE]
    }
}

/// What a run returns, read back: out, final states and the gradients of
/// q, k, v and the initial states (`[T, H, *]` and `[N, H, D, E]` layouts).
#[derive(Default)]
struct Results {
    out: Vec<f64>,
    final_states: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    d_initial: Vec<f64>,
}

/// The packed call on autodiff leaves; the loss is `<out, W> + <final, W_f>`
/// (the second term where `with_final`).
fn run_packed(p: &Packed, device: &Device, with_initial: bool, with_final: bool) -> Results {
    let t = p.tokens;
    let q = tensor(&p.q, [1, t, HEADS, KEY_DIM], device).require_grad();
    let k = tensor(&p.k, [1, t, HEADS, KEY_DIM], device).require_grad();
    let v = tensor(&p.v, [1, t, HEADS, VALUE_DIM], device).require_grad();
    let states = [p.docs(), HEADS, KEY_DIM, VALUE_DIM];
    let initial = tensor(&p.initial, states, device).require_grad();
    let (out, final_states) = fla_lightning_attention_packed(
        q.clone(),
        k.clone(),
        v.clone(),
        tensor(&slopes(HEADS), [HEADS], device),
        &p.cu,
        with_initial.then(|| initial.clone()),
        with_final,
        config(),
    )
    .expect("a valid packed call");
    assert_eq!(out.dims(), [1, t, HEADS, VALUE_DIM]);
    assert_eq!(final_states.is_some(), with_final);
    let mut loss = (out.clone() * tensor(&p.w_out, [1, t, HEADS, VALUE_DIM], device)).sum();
    let mut results = Results {
        out: read(out),
        ..Results::default()
    };
    if let Some(finals) = final_states {
        assert_eq!(finals.dims(), states);
        loss = loss + (finals.clone() * tensor(&p.w_final, states, device)).sum();
        results.final_states = read(finals);
    }
    let grads = loss.backward();
    let grad =
        |x: &Tensor<4>, what: &str| read(x.grad(&grads).unwrap_or_else(|| panic!("{what}: no gradient")));
    results.dq = grad(&q, "q");
    results.dk = grad(&k, "k");
    results.dv = grad(&v, "v");
    if with_initial {
        results.d_initial = grad(&initial, "initial states");
    } else {
        assert!(initial.grad(&grads).is_none(), "no initial states were given");
    }
    results
}

/// The same documents one by one through `fla_lightning_attention`, each
/// with its own leaves and loss, the results concatenated (zeros for the
/// padding rows). An empty document runs nothing: its final state is its
/// initial state, and its initial state's gradient the final state's weight.
fn run_one_by_one(p: &Packed, device: &Device, with_initial: bool, with_final: bool) -> Results {
    let mut r = Results::default();
    for doc in 0..p.docs() {
        let len = (p.cu[doc + 1] - p.cu[doc]) as usize;
        let zeros = vec![0.0; STATE];
        let initial_values = if with_initial {
            p.state(&p.initial, doc)
        } else {
            &zeros
        };
        let w_final = p.state(&p.w_final, doc);
        if len == 0 {
            r.final_states.extend_from_slice(initial_values);
            r.d_initial
                .extend(w_final.iter().map(|&w| if with_final { w } else { 0.0 }));
            continue;
        }
        let q = tensor(p.rows(&p.q, doc, KEY_DIM), [1, len, HEADS, KEY_DIM], device).require_grad();
        let k = tensor(p.rows(&p.k, doc, KEY_DIM), [1, len, HEADS, KEY_DIM], device).require_grad();
        let v = tensor(p.rows(&p.v, doc, VALUE_DIM), [1, len, HEADS, VALUE_DIM], device).require_grad();
        let state = [1, HEADS, KEY_DIM, VALUE_DIM];
        let initial = tensor(initial_values, state, device).require_grad();
        let (out, final_state) = fla_lightning_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            tensor(&slopes(HEADS), [HEADS], device),
            with_initial.then(|| initial.clone()),
            true,
            config(),
        )
        .expect("a valid document");
        let final_state = final_state.expect("asked for");
        let w_out = tensor(
            p.rows(&p.w_out, doc, VALUE_DIM),
            [1, len, HEADS, VALUE_DIM],
            device,
        );
        let mut loss = (out.clone() * w_out).sum();
        if with_final {
            loss = loss + (final_state.clone() * tensor(w_final, state, device)).sum();
        }
        r.out.extend(read(out));
        r.final_states.extend(read(final_state));
        let grads = loss.backward();
        let grad = |x: &Tensor<4>| read(x.grad(&grads).expect("a gradient"));
        r.dq.extend(grad(&q));
        r.dk.extend(grad(&k));
        r.dv.extend(grad(&v));
        r.d_initial
            .extend(if with_initial { grad(&initial) } else { zeros });
    }
    for (values, width) in [
        (&mut r.out, VALUE_DIM),
        (&mut r.dq, KEY_DIM),
        (&mut r.dk, KEY_DIM),
        (&mut r.dv, VALUE_DIM),
    ] {
        values.extend(std::iter::repeat_n(0.0, PADDING * HEADS * width));
    }
    r
}

/// `actual` equals `expected`, and the padding rows (the last `padding`
/// values) are exactly zero.
fn check_packed(what: &str, actual: &[f64], expected: &[f64], padding: usize) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    check(what, actual, expected);
    let tail = &actual[actual.len() - padding..];
    assert!(tail.iter().all(|&x| x == 0.0), "{what}: padding rows not zero");
}

#[test]
fn packed_matches_documents_one_by_one() {
    let device = device().autodiff();
    // (initial states given, final states returned and in the loss)
    for (seed, (with_initial, with_final)) in [(true, true), (false, true), (true, false), (false, false)]
        .into_iter()
        .enumerate()
    {
        let p = packed_problem(&LENGTHS, 40 + seed as u64);
        let case = format!("initial {with_initial}, final {with_final}");
        let packed = run_packed(&p, &device, with_initial, with_final);
        let docs = run_one_by_one(&p, &device, with_initial, with_final);
        let (pad_qk, pad_v) = (PADDING * HEADS * KEY_DIM, PADDING * HEADS * VALUE_DIM);
        check_packed(&format!("out, {case}"), &packed.out, &docs.out, pad_v);
        check_packed(&format!("dq, {case}"), &packed.dq, &docs.dq, pad_qk);
        check_packed(&format!("dk, {case}"), &packed.dk, &docs.dk, pad_qk);
        check_packed(&format!("dv, {case}"), &packed.dv, &docs.dv, pad_v);
        if with_final {
            check(
                &format!("final states, {case}"),
                &packed.final_states,
                &docs.final_states,
            );
        }
        if with_initial {
            check(
                &format!("d_initial_states, {case}"),
                &packed.d_initial,
                &docs.d_initial,
            );
        }
    }
}

/// Without autodiff: the packed forward against the f64 reference run on
/// each document alone.
#[test]
fn packed_forward_matches_reference() {
    let device = device();
    let p = packed_problem(&LENGTHS, 50);
    let t = p.tokens;
    let states = [p.docs(), HEADS, KEY_DIM, VALUE_DIM];
    let (out, final_states) = fla_lightning_attention_packed(
        tensor(&p.q, [1, t, HEADS, KEY_DIM], &device),
        tensor(&p.k, [1, t, HEADS, KEY_DIM], &device),
        tensor(&p.v, [1, t, HEADS, VALUE_DIM], &device),
        tensor(&slopes(HEADS), [HEADS], &device),
        &p.cu,
        Some(tensor(&p.initial, states, &device)),
        true,
        config(),
    )
    .expect("a valid packed call");
    let (out, final_states) = (read(out), read(final_states.expect("asked for")));
    // [T, H, *] rows of one document to the reference's [1, H, n, *] and back.
    let to_heads = |rows: &[f64], len: usize, width: usize| {
        let mut out = vec![0.0; rows.len()];
        for t in 0..len {
            for h in 0..HEADS {
                for c in 0..width {
                    out[(h * len + t) * width + c] = rows[(t * HEADS + h) * width + c];
                }
            }
        }
        out
    };
    for doc in 0..p.docs() {
        let len = (p.cu[doc + 1] - p.cu[doc]) as usize;
        let initial = p.state(&p.initial, doc);
        let finals = p.state(&final_states, doc);
        if len == 0 {
            assert_eq!(
                finals, initial,
                "document {doc} is empty: its state passes through"
            );
            continue;
        }
        let dims = Dims {
            batch: 1,
            heads: HEADS,
            seq_len: len,
            key_dim: KEY_DIM,
            value_dim: VALUE_DIM,
        };
        let expected = reference::recurrence(
            dims,
            &to_heads(p.rows(&p.q, doc, KEY_DIM), len, KEY_DIM),
            &to_heads(p.rows(&p.k, doc, KEY_DIM), len, KEY_DIM),
            &to_heads(p.rows(&p.v, doc, VALUE_DIM), len, VALUE_DIM),
            &slopes(HEADS),
            Some(initial),
        );
        let got = to_heads(p.rows(&out, doc, VALUE_DIM), len, VALUE_DIM);
        check(&format!("document {doc} out"), &got, &expected.out);
        check(&format!("document {doc} final state"), finals, &expected.state);
    }
    let padding = &out[out.len() - PADDING * HEADS * VALUE_DIM..];
    assert!(padding.iter().all(|&x| x == 0.0), "padding rows not zero");
}

#[test]
fn packed_bad_input_returns_typed_errors() {
    for device in [device(), device().autodiff()] {
        let t = 10;
        let zeros = |shape: [usize; 4]| Tensor::<4>::zeros(shape, &device);
        let call = |q: Tensor<4>, k: Tensor<4>, cu: &[u32], initial: Option<Tensor<4>>| {
            fla_lightning_attention_packed(
                q,
                k,
                zeros([1, t, HEADS, VALUE_DIM]),
                Tensor::zeros([HEADS], &device),
                cu,
                initial,
                true,
                config(),
            )
        };
        let q = || zeros([1, t, HEADS, KEY_DIM]);

        let err = call(q(), q(), &[1, 4, 10], None).expect_err("starts at 1");
        assert!(matches!(err, LightningError::FirstOffset { value: 1 }), "{err}");
        let err = call(q(), q(), &[0, 6, 4, 10], None).expect_err("decreases");
        assert!(
            matches!(
                err,
                LightningError::OffsetsDecreasing {
                    index: 2,
                    previous: 6,
                    value: 4
                }
            ),
            "{err}"
        );
        let err = call(q(), q(), &[0, 4, 11], None).expect_err("past T");
        assert!(
            matches!(
                err,
                LightningError::OffsetPastEnd {
                    index: 2,
                    value: 11,
                    total_tokens: 10
                }
            ),
            "{err}"
        );
        let err = call(q(), q(), &[0], None).expect_err("no document");
        assert!(
            matches!(
                err,
                LightningError::LengthMismatch {
                    what: "cu_seqlens",
                    ..
                }
            ),
            "{err}"
        );
        // Two documents, three initial states: told in the caller's layout.
        let err = call(q(), q(), &[0, 4, 10], Some(zeros([3, HEADS, KEY_DIM, VALUE_DIM])))
            .expect_err("states of 3 documents");
        assert_eq!(
            err,
            LightningError::Shape {
                tensor: "initial_state",
                expected: vec![2, HEADS, KEY_DIM, VALUE_DIM],
                layout: "[N, H, D, E]",
                actual: vec![3, HEADS, KEY_DIM, VALUE_DIM],
            }
        );
        // k of another head dim: the shapes as the caller gave them, [1, T, H, D].
        let err = call(q(), zeros([1, t, HEADS, 8]), &[0, 10], None).expect_err("k's D differs");
        assert_eq!(
            err,
            LightningError::Shape {
                tensor: "k",
                expected: vec![1, t, HEADS, KEY_DIM],
                layout: "[1, T, H, D]",
                actual: vec![1, t, HEADS, 8],
            }
        );
        // Packed documents are one batch row, as in FLA.
        let err = call(zeros([2, t, HEADS, KEY_DIM]), q(), &[0, 10], None).expect_err("two rows");
        assert!(matches!(err, LightningError::Shape { tensor: "q", .. }), "{err}");
        // A valid call on the same tensors runs.
        call(q(), q(), &[0, 4, 4, 10], None).expect("valid call");
    }
}
