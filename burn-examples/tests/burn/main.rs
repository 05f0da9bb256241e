//! The Burn backend extension through Burn's public API on the wgpu backend:
//! forward against the f64 reference recurrence, gradients through autodiff
//! against the f64 reference backward, the FLA layout, decode, and a typed
//! error on bad input. Packed documents (`cu_seqlens`) are in `packed.rs`.

mod layer;
mod layout_errors;
mod packed;
mod training;

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use lightning_attention::burn::{
    fla_lightning_attention, lightning_attention, lightning_attention_with_config, lightning_decode,
};
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{self, Dims, relative_error};
use lightning_attention::{LightningError, PrefillConfig};

/// Bound on `||x - ref|| / ||ref||` for f32.
const TOLERANCE: f64 = 1e-4;

/// The wgpu device, or CUDA's first device in a build with the `cuda`
/// feature when `LIGHTNING_ATTENTION_RUNTIME=cuda` (as on the GPU machine).
fn device() -> Device {
    #[cfg(feature = "cuda")]
    if std::env::var("LIGHTNING_ATTENTION_RUNTIME").as_deref() == Ok("cuda") {
        return Device::cuda(0);
    }
    Device::wgpu(DeviceKind::DefaultDevice)
}

fn values(rng: &mut SeededRng, len: usize) -> Vec<f64> {
    // Round to f32 so that the reference sees exactly what the device sees.
    rng.values(len).into_iter().map(|x| x as f32 as f64).collect()
}

fn slopes(heads: usize) -> Vec<f64> {
    (0..heads)
        .map(|h| (0.1 + 0.15 * h as f64) as f32 as f64)
        .collect()
}

fn tensor<const D: usize>(data: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let data: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn read<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    tensor
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn check(what: &str, actual: &[f64], expected: &[f64]) {
    let err = relative_error(actual, expected);
    assert!(err < TOLERANCE, "{what}: relative error {err:e}");
}

struct Problem {
    dims: Dims,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    slopes: Vec<f64>,
    initial: Vec<f64>,
}

fn problem(
    batch: usize,
    heads: usize,
    seq_len: usize,
    key_dim: usize,
    value_dim: usize,
    seed: u64,
) -> Problem {
    let mut rng = SeededRng::new(seed);
    let (b, h, n, d, e) = (batch, heads, seq_len, key_dim, value_dim);
    Problem {
        dims: Dims {
            batch,
            heads,
            seq_len,
            key_dim,
            value_dim,
        },
        q: values(&mut rng, b * h * n * d),
        k: values(&mut rng, b * h * n * d),
        v: values(&mut rng, b * h * n * e),
        slopes: slopes(h),
        initial: values(&mut rng, b * h * d * e),
    }
}

impl Problem {
    fn shapes(&self) -> ([usize; 4], [usize; 4], [usize; 4]) {
        let Dims {
            batch: b,
            heads: h,
            seq_len: n,
            key_dim: d,
            value_dim: e,
        } = self.dims;
        ([b, h, n, d], [b, h, n, e], [b, h, d, e])
    }
}

#[test]
fn forward_matches_reference() {
    let device = device();
    for (block, sub_block, n, with_initial) in [(16, 16, 37, false), (32, 16, 70, true), (64, 32, 65, true)] {
        let p = problem(2, 2, n, 16, 24, n as u64);
        let (qk, ve, state) = p.shapes();
        let initial = with_initial.then(|| tensor(&p.initial, state, &device));
        let (out, final_state) = lightning_attention_with_config(
            tensor(&p.q, qk, &device),
            tensor(&p.k, qk, &device),
            tensor(&p.v, ve, &device),
            tensor(&p.slopes, [p.dims.heads], &device),
            initial,
            PrefillConfig::new(block, sub_block),
        )
        .expect("valid problem");
        let expected = reference::recurrence(
            p.dims,
            &p.q,
            &p.k,
            &p.v,
            &p.slopes,
            with_initial.then_some(p.initial.as_slice()),
        );
        check(&format!("out, block {block}"), &read(out), &expected.out);
        check(
            &format!("final state, block {block}"),
            &read(final_state),
            &expected.state,
        );
    }
}

#[test]
fn gradients_match_reference() {
    let device = device().autodiff();
    // (block, sub_block, tokens, final state in the loss, initial state given)
    for (block, sub_block, n, use_state, with_initial) in [
        (16, 16, 29, true, true),
        (32, 16, 70, false, true),
        (64, 32, 65, true, false),
    ] {
        let p = problem(1, 2, n, 16, 8, 100 + n as u64);
        let (qk, ve, state) = p.shapes();
        let mut rng = SeededRng::new(7 + n as u64);
        let d_out = values(&mut rng, ve.iter().product());
        let d_final = values(&mut rng, state.iter().product());

        let q = tensor(&p.q, qk, &device).require_grad();
        let k = tensor(&p.k, qk, &device).require_grad();
        let v = tensor(&p.v, ve, &device).require_grad();
        let initial = tensor(&p.initial, state, &device).require_grad();
        let slopes = tensor(&p.slopes, [p.dims.heads], &device);
        let (out, final_state) = lightning_attention_with_config(
            q.clone(),
            k.clone(),
            v.clone(),
            slopes,
            with_initial.then(|| initial.clone()),
            PrefillConfig::new(block, sub_block),
        )
        .expect("valid problem");
        // L = <out, d_out> (+ <final_state, d_final>): its gradients are the backward's.
        let mut loss = (out * tensor(&d_out, ve, &device)).sum();
        if use_state {
            loss = loss + (final_state * tensor(&d_final, state, &device)).sum();
        }
        let grads = loss.backward();

        let expected = reference::backward(
            p.dims,
            &p.q,
            &p.k,
            &p.v,
            &p.slopes,
            with_initial.then_some(p.initial.as_slice()),
            None,
            &d_out,
            use_state.then_some(d_final.as_slice()),
        );
        let grad = |t: &Tensor<4>| {
            read(
                t.grad(&grads)
                    .unwrap_or_else(|| panic!("no gradient, block {block}")),
            )
        };
        check(&format!("dq, block {block}"), &grad(&q), &expected.dq);
        check(&format!("dk, block {block}"), &grad(&k), &expected.dk);
        check(&format!("dv, block {block}"), &grad(&v), &expected.dv);
        if with_initial {
            check(
                &format!("d_initial, block {block}"),
                &grad(&initial),
                &expected.d_initial_state,
            );
        } else {
            assert!(initial.grad(&grads).is_none(), "no initial state was given");
        }
    }
}

/// The gradients autodiff returns are the loss's slope: central differences
/// of `L = <out, W> + <final_state, W_f>` through the forward on the device,
/// at a few entries of q, k, v and the initial state, across two blocks.
#[test]
fn gradients_match_finite_differences() {
    let device = device();
    let p = problem(1, 1, 21, 8, 8, 31);
    let (qk, ve, state) = p.shapes();
    let mut rng = SeededRng::new(32);
    let w_out = values(&mut rng, ve.iter().product());
    let w_final = values(&mut rng, state.iter().product());
    let config = PrefillConfig::new(16, 16);
    let loss_at = |device: &Device, [q, k, v, initial]: [&[f64]; 4]| {
        let slopes = tensor(&p.slopes, [1], device);
        let (out, final_state) = lightning_attention_with_config(
            tensor(q, qk, device),
            tensor(k, qk, device),
            tensor(v, ve, device),
            slopes,
            Some(tensor(initial, state, device)),
            config,
        )
        .expect("valid problem");
        (out * tensor(&w_out, ve, device)).sum() + (final_state * tensor(&w_final, state, device)).sum()
    };

    let ad = device.clone().autodiff();
    let inputs = [&p.q, &p.k, &p.v, &p.initial];
    let shapes = [qk, qk, ve, state];
    let leaves: Vec<Tensor<4>> = inputs
        .iter()
        .zip(shapes)
        .map(|(x, shape)| tensor(x, shape, &ad).require_grad())
        .collect();
    let slopes = tensor(&p.slopes, [1], &ad);
    let (out, final_state) = lightning_attention_with_config(
        leaves[0].clone(),
        leaves[1].clone(),
        leaves[2].clone(),
        slopes,
        Some(leaves[3].clone()),
        config,
    )
    .expect("valid problem");
    let loss = (out * tensor(&w_out, ve, &ad)).sum() + (final_state * tensor(&w_final, state, &ad)).sum();
    let grads = loss.backward();

    let eps = 1e-2;
    for (which, leaf) in leaves.iter().enumerate() {
        let grad = read(leaf.grad(&grads).expect("a gradient"));
        for _ in 0..4 {
            let at = (rng.values(1)[0].abs() * 1e6) as usize % grad.len();
            let shifted = |delta: f64| {
                let mut moved: Vec<Vec<f64>> = inputs.iter().map(|x| x.to_vec()).collect();
                moved[which][at] += delta;
                let args = [&moved[0][..], &moved[1][..], &moved[2][..], &moved[3][..]];
                read(loss_at(&device, args).reshape([1, 1, 1, 1]))[0]
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let err = (fd - grad[at]).abs();
            assert!(
                err <= 1e-2 * grad[at].abs().max(1.0),
                "input {which}, entry {at}: autodiff {} vs finite difference {fd}",
                grad[at]
            );
        }
    }
}

#[test]
fn fla_layout_matches_reference() {
    let device = device();
    let p = problem(1, 2, 21, 16, 8, 5);
    let (qk, ve, state) = p.shapes();
    let swap = [0, 2, 1, 3];
    // Inputs given as [B, T, H, *]: permute the [B, H, T, *] data with Burn itself.
    let (out, final_state) = fla_lightning_attention(
        tensor(&p.q, qk, &device).permute(swap),
        tensor(&p.k, qk, &device).permute(swap),
        tensor(&p.v, ve, &device).permute(swap),
        tensor(&p.slopes, [p.dims.heads], &device),
        Some(tensor(&p.initial, state, &device)),
        true,
        PrefillConfig::new(16, 16),
    )
    .expect("valid problem");
    let expected = reference::recurrence(p.dims, &p.q, &p.k, &p.v, &p.slopes, Some(&p.initial));
    assert_eq!(out.dims(), [1, 21, 2, 8]);
    check("fla out", &read(out.permute(swap)), &expected.out);
    check(
        "fla final state",
        &read(final_state.expect("asked for")),
        &expected.state,
    );
}

#[test]
fn decode_matches_reference() {
    let device = device();
    let (h, d, e, slots) = (2, 16, 8, 3);
    let mut rng = SeededRng::new(11);
    let cache = values(&mut rng, slots * h * d * e);
    let q = values(&mut rng, 2 * h * d);
    let k = values(&mut rng, 2 * h * d);
    let v = values(&mut rng, 2 * h * e);
    let s = slopes(h);
    let slot_ids = [2, 0];
    let cache_tensor = tensor(&cache, [slots, h, d, e], &device);
    let (out, new_cache) = lightning_decode(
        tensor(&q, [2, h, 1, d], &device),
        tensor(&k, [2, h, 1, d], &device),
        tensor(&v, [2, h, 1, e], &device),
        cache_tensor.clone(),
        tensor(&s, [h], &device),
        &slot_ids,
        None,
    )
    .expect("valid step");
    // Each decoded sequence is a one-token prefill from its slot's state.
    let (out, new_cache) = (read(out), read(new_cache));
    let one = Dims {
        batch: 1,
        heads: h,
        seq_len: 1,
        key_dim: d,
        value_dim: e,
    };
    for (i, &slot) in slot_ids.iter().enumerate() {
        let slot = slot as usize;
        let state = &cache[slot * h * d * e..(slot + 1) * h * d * e];
        let expected = reference::recurrence(
            one,
            &q[i * h * d..(i + 1) * h * d],
            &k[i * h * d..(i + 1) * h * d],
            &v[i * h * e..(i + 1) * h * e],
            &s,
            Some(state),
        );
        check("decode out", &out[i * h * e..(i + 1) * h * e], &expected.out);
        check(
            "decode cache",
            &new_cache[slot * h * d * e..(slot + 1) * h * d * e],
            &expected.state,
        );
    }
    // The caller's cache tensor still holds its values: Burn tensors are values.
    assert_eq!(read(cache_tensor), cache);
    // Slot 1 is untouched.
    assert_eq!(
        &new_cache[h * d * e..2 * h * d * e],
        &cache[h * d * e..2 * h * d * e]
    );
}

/// bf16 rounded to nearest even from f32, back in f64 (the cache's values;
/// finite inputs).
fn round_bf16(x: f64) -> f64 {
    let bits = (x as f32).to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded) as f64
}

/// A bf16 cache (issue 30) through Burn: the library reads its dtype from
/// the tensor, computes in f32 and rounds the written state once. The
/// output is held to the f32 bound (it comes from the state before
/// rounding); the new state to the reference's state rounded to bf16 (one
/// bf16 step at most where the f32 update lies at a rounding boundary), and
/// the untouched slot keeps its bf16 values.
#[test]
fn decode_with_a_bf16_cache_matches_rounded_reference() {
    let device = device();
    let (h, d, e, slots) = (2, 16, 8, 3);
    let mut rng = SeededRng::new(12);
    let cache: Vec<f64> = values(&mut rng, slots * h * d * e)
        .into_iter()
        .map(round_bf16)
        .collect();
    let q = values(&mut rng, 2 * h * d);
    let k = values(&mut rng, 2 * h * d);
    let v = values(&mut rng, 2 * h * e);
    let s = slopes(h);
    let slot_ids = [0, 2];
    // Made bf16 on the host: Burn's cast kernel has no bf16 under WGSL.
    let cache_data: Vec<f32> = cache.iter().map(|&x| x as f32).collect();
    let cache_tensor = Tensor::<4>::from_data(
        TensorData::new(cache_data, [slots, h, d, e]),
        (&device, burn::tensor::DType::BF16),
    );
    let (out, new_cache) = lightning_decode(
        tensor(&q, [2, h, 1, d], &device),
        tensor(&k, [2, h, 1, d], &device),
        tensor(&v, [2, h, 1, e], &device),
        cache_tensor,
        tensor(&s, [h], &device),
        &slot_ids,
        None,
    )
    .expect("valid step with a bf16 cache");
    let out = read(out);
    assert_eq!(
        new_cache.dtype(),
        burn::tensor::DType::BF16,
        "the cache keeps its dtype"
    );
    let new_cache: Vec<f64> = new_cache
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect();
    let one = Dims {
        batch: 1,
        heads: h,
        seq_len: 1,
        key_dim: d,
        value_dim: e,
    };
    let per_slot = h * d * e;
    for (i, &slot) in slot_ids.iter().enumerate() {
        let slot = slot as usize;
        let expected = reference::recurrence(
            one,
            &q[i * h * d..(i + 1) * h * d],
            &k[i * h * d..(i + 1) * h * d],
            &v[i * h * e..(i + 1) * h * e],
            &s,
            Some(&cache[slot * per_slot..(slot + 1) * per_slot]),
        );
        check(
            "bf16-cache decode out",
            &out[i * h * e..(i + 1) * h * e],
            &expected.out,
        );
        let state = &new_cache[slot * per_slot..(slot + 1) * per_slot];
        // The f32 update's own error, where an element cancels to near zero.
        let slack = 1e-6 * expected.state.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (j, (&got, &want)) in state.iter().zip(&expected.state).enumerate() {
            assert_eq!(
                got,
                round_bf16(got),
                "slot {slot}, element {j}: {got} is not a bf16 value"
            );
            let step = want.abs() * 2f64.powi(-7) + slack;
            assert!(
                (got - round_bf16(want)).abs() <= step,
                "slot {slot}, element {j}: {got} against {want} rounded to {}",
                round_bf16(want)
            );
        }
    }
    // Slot 1 is untouched.
    assert_eq!(&new_cache[per_slot..2 * per_slot], &cache[per_slot..2 * per_slot]);
}

#[test]
fn bad_input_returns_typed_error() {
    let device = device().autodiff();
    let (b, h, n, d, e) = (1, 2, 8, 16, 8);
    let q = Tensor::<4>::zeros([b, h, n, d], &device);
    let k = Tensor::<4>::zeros([b, h, n + 1, d], &device);
    let v = Tensor::<4>::zeros([b, h, n, e], &device);
    let slopes = Tensor::<1>::zeros([h], &device);
    let err = lightning_attention(q.clone(), k, v.clone(), slopes.clone(), None).expect_err("k's n differs");
    assert!(matches!(err, LightningError::Shape { tensor: "k", .. }), "{err}");

    let err = lightning_attention_with_config(
        q,
        q_like(b, h, n, d, &device),
        v,
        slopes,
        None,
        PrefillConfig::new(48, 16),
    )
    .expect_err("bad block");
    assert!(matches!(err, LightningError::InvalidBlock { .. }), "{err}");
}

fn q_like(b: usize, h: usize, n: usize, d: usize, device: &Device) -> Tensor<4> {
    Tensor::zeros([b, h, n, d], device)
}

/// The operation between ordinary Burn ops, as a model uses it: inputs made by
/// ops (a scaled q, a sliced sequence, a computed initial state), outputs
/// consumed by ops (a second call continuing from the first's final state, a
/// concatenation, a scale and a sum). Under Fusion all of it is lazy until the
/// reads, so this checks that the custom operation is ordered right among them.
#[test]
fn composes_with_burn_ops() {
    let device = device();
    let p = problem(1, 2, 45, 16, 8, 21);
    let Dims {
        batch: b,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = p.dims;
    let (qk, ve, state) = p.shapes();
    let config = PrefillConfig::new(16, 16);
    let half = 20;
    // The device sees q / 2 and doubles it with a Burn op (exact in f32).
    let q_half: Vec<f64> = p.q.iter().map(|x| x / 2.0).collect();
    let q = tensor(&q_half, qk, &device) * 2.0;
    let k = tensor(&p.k, qk, &device);
    let v = tensor(&p.v, ve, &device);
    let initial = tensor(&p.initial, state, &device) * 0.5;
    let part = |t: &Tensor<4>, dim: usize, range: std::ops::Range<usize>| {
        let mut dims = t.dims().map(|size| 0..size);
        dims[dim] = range;
        t.clone().slice(dims)
    };
    let slopes = tensor(&p.slopes, [h], &device);
    // The sequence in two calls: the second starts from the first's final state.
    let (out_a, state_a) = lightning_attention_with_config(
        part(&q, 2, 0..half),
        part(&k, 2, 0..half),
        part(&v, 2, 0..half),
        slopes.clone(),
        Some(initial),
        config,
    )
    .expect("valid first half");
    let (out_b, final_state) = lightning_attention_with_config(
        part(&q, 2, half..n),
        part(&k, 2, half..n),
        part(&v, 2, half..n),
        slopes,
        Some(state_a),
        config,
    )
    .expect("valid second half");
    let out = Tensor::cat(vec![out_a, out_b], 2) * 3.0;
    let total = out.clone().sum();
    let state_sum = final_state.clone().sum_dim(3);

    let initial_half: Vec<f64> = p.initial.iter().map(|x| x * 0.5).collect();
    let expected = reference::recurrence(p.dims, &p.q, &p.k, &p.v, &p.slopes, Some(&initial_half));
    let expected_out: Vec<f64> = expected.out.iter().map(|x| x * 3.0).collect();
    assert_eq!(out.dims(), [b, h, n, e]);
    check("composed out", &read(out), &expected_out);
    check("composed final state", &read(final_state), &expected.state);
    let expected_total: f64 = expected_out.iter().sum();
    let scale = expected_out.iter().map(|x| x.abs()).sum::<f64>();
    let total = read(total)[0];
    assert!(
        (total - expected_total).abs() <= TOLERANCE * scale,
        "sum {total} vs {expected_total}"
    );
    let expected_rows: Vec<f64> = expected.state.chunks(e).map(|row| row.iter().sum()).collect();
    assert_eq!(expected_rows.len(), b * h * d);
    check("state row sums", &read(state_sum), &expected_rows);
    // The inputs are untouched.
    assert_eq!(read(v), p.v);
}

/// Bad calls come back as typed errors on whichever backend `Device::wgpu`
/// runs (the CubeCL backend, or Fusion with the feature `fusion`), with and
/// without autodiff, and before anything runs.
#[test]
fn typed_errors_on_the_active_backend() {
    for device in [device(), device().autodiff()] {
        let (b, h, n, d, e) = (1, 2, 8, 16, 8);
        let q = Tensor::<4>::zeros([b, h, n, d], &device);
        let v = Tensor::<4>::zeros([b, h, n, e], &device);
        let slopes = Tensor::<1>::zeros([h], &device);
        let call = |q: Tensor<4>, k: Tensor<4>, slopes: Tensor<1>, config: PrefillConfig| {
            lightning_attention_with_config(q, k, v.clone(), slopes, None, config)
        };
        let ok = PrefillConfig::new(16, 16);

        // A block that CBLOCK does not divide.
        let err =
            call(q.clone(), q.clone(), slopes.clone(), PrefillConfig::new(32, 24)).expect_err("bad block");
        assert!(matches!(err, LightningError::InvalidBlock { .. }), "{err}");
        // One slope too many.
        let err = call(q.clone(), q.clone(), Tensor::zeros([h + 1], &device), ok).expect_err("bad slopes");
        assert!(
            matches!(err, LightningError::Shape { tensor: "slopes", .. }),
            "{err}"
        );
        // k in another dtype than q.
        let k = q.clone().cast(burn::tensor::FloatDType::F16);
        let err = call(q.clone(), k, slopes.clone(), ok).expect_err("k is f16");
        assert!(
            matches!(
                err,
                LightningError::DType {
                    tensor: "k",
                    expected: lightning_attention::DType::F32,
                    actual: lightning_attention::DType::F16
                }
            ),
            "{err}"
        );
        // A tile larger than the device's shared memory: a device limit, from the device's client.
        let err =
            call(q.clone(), q.clone(), slopes.clone(), PrefillConfig::new(256, 256)).expect_err("too big");
        assert!(matches!(err, LightningError::DoesNotFit { .. }), "{err}");
        // The initial state in the wrong layout.
        let err = lightning_attention(
            q.clone(),
            q.clone(),
            v.clone(),
            slopes.clone(),
            Some(Tensor::zeros([b, h, e, d], &device)),
        )
        .expect_err("state is [b, h, e, d]");
        assert!(
            matches!(
                err,
                LightningError::Shape {
                    tensor: "initial_state",
                    ..
                }
            ),
            "{err}"
        );

        // Decode: a slot past the cache, a slot used twice, two tokens instead of one.
        let step = |q_len: usize, slots: &[i32]| {
            lightning_decode(
                Tensor::zeros([2, h, q_len, d], &device),
                Tensor::zeros([2, h, q_len, d], &device),
                Tensor::zeros([2, h, q_len, e], &device),
                Tensor::zeros([3, h, d, e], &device),
                Tensor::zeros([h], &device),
                slots,
                None,
            )
        };
        let err = step(1, &[0, 3]).expect_err("slot 3 of 3");
        assert!(
            matches!(err, LightningError::SlotOutOfRange { slot: 3, .. }),
            "{err}"
        );
        let err = step(1, &[1, 1]).expect_err("slot 1 twice");
        assert!(
            matches!(err, LightningError::DuplicateSlot { slot: 1, .. }),
            "{err}"
        );
        let err = step(2, &[0, 1]).expect_err("two tokens");
        assert!(matches!(err, LightningError::Shape { tensor: "q", .. }), "{err}");
        step(1, &[0, -1]).expect("valid step");
    }
}
