//! [`LightningAttentionBackend`] for `Autodiff<B>`: the forward (dense or
//! packed) runs on `B` and registers one backward step per output (the
//! output and the final state or states, where returned), each calling `B`'s
//! backward of that forward with its upstream gradient (the other one
//! zero). Gradients add up linearly, and a step runs only if its output
//! reaches the loss. Slopes and `cu_seqlens` are constants; the checks and
//! decode run on `B` untracked.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;

use super::{LightningAttentionBackend, OptionalTensor};
use crate::{PrefillConfig, Result};

/// Which prefill output a backward step differentiates.
#[derive(Clone, Copy, Debug)]
enum Output {
    /// The attention output `[b, h, n, e]`.
    Out,
    /// The final state `[b, h, d, e]`.
    FinalState,
}

/// Which forward a backward step differentiates.
#[derive(Clone, Debug)]
enum Call {
    /// [`LightningAttentionBackend::lightning_prefill`]: `[b, h, n, *]`.
    Dense,
    /// [`LightningAttentionBackend::lightning_prefill_packed`] over these
    /// offsets: `[T, h, *]`, states `[N, h, d, e]`.
    Packed(Vec<u32>),
}

/// The backward step of one prefill output.
#[derive(Debug)]
struct PrefillBackward {
    output: Output,
    call: Call,
    config: PrefillConfig,
}

/// The forward's inputs, kept for the backward pass: q, k, v, slopes, initial state.
type Saved<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

impl PrefillBackward {
    /// Runs `B`'s backward for this step's output and registers the gradients
    /// of the parents that require one (q, k, v and, if given, the initial state).
    fn run<B: LightningAttentionBackend>(
        self,
        grad: FloatTensor<B>,
        state: Saved<B>,
        grads: &mut Gradients,
        parents: [Option<NodeId>; 4],
    ) {
        let (q, k, v, slopes, initial_state) = state;
        let (d_out, d_final_state) = match self.output {
            Output::Out => (Some(grad), None),
            Output::FinalState => (None, Some(grad)),
        };
        let (initial_state, d_out, d_final_state) = (
            OptionalTensor::new(initial_state),
            OptionalTensor::new(d_out),
            OptionalTensor::new(d_final_state),
        );
        let (dq, dk, dv, d_initial) = match self.call {
            Call::Dense => {
                let (dq, dk, dv, d_initial) = B::lightning_prefill_backward(
                    q,
                    k,
                    v,
                    slopes,
                    initial_state,
                    d_out,
                    d_final_state,
                    self.config,
                );
                (dq, dk, dv, Some(d_initial))
            }
            Call::Packed(cu_seqlens) => {
                let (dq, dk, dv, d_initial) = B::lightning_packed_backward(
                    q,
                    k,
                    v,
                    slopes,
                    cu_seqlens,
                    initial_state,
                    d_out,
                    d_final_state,
                    self.config,
                );
                (dq, dk, dv, d_initial.into_option())
            }
        };
        let computed = [Some(dq), Some(dk), Some(dv), d_initial];
        for (node, grad) in parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node, grad);
            }
        }
    }
}

/// The backward step with the initial state as a parent.
impl<B: LightningAttentionBackend> Backward<B, 4> for PrefillBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let parents = ops.parents.map(|node| node.map(|node| node.id));
        self.run::<B>(grad, ops.state, grads, parents);
    }
}

/// The backward step of a prefill without an initial state.
impl<B: LightningAttentionBackend> Backward<B, 3> for PrefillBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [q, k, v] = ops.parents.map(|node| node.map(|node| node.id));
        self.run::<B>(grad, ops.state, grads, [q, k, v, None]);
    }
}

/// Registers one output's backward step with `nodes` as parents.
fn track<B, C, const N: usize>(
    step: PrefillBackward,
    nodes: [NodeGuard; N],
    saved: &Saved<B>,
    tensor: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: LightningAttentionBackend,
    C: CheckpointStrategy,
    PrefillBackward: Backward<B, N, State = Saved<B>>,
{
    match step.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved.clone(), tensor),
        OpsKind::UnTracked(prep) => prep.finish(tensor),
    }
}

/// An autodiff tensor over `B`.
type Tracked<B, C> = FloatTensor<Autodiff<B, C>>;

/// Runs `forward` on the inner backend's q, k, v, slopes and initial
/// state, and tracks its output and, where it returns one, its final state:
/// each a backward step of `call` with q, k, v and the initial state (if
/// given) as parents.
fn forward_tracked<B, C>(
    call: Call,
    config: PrefillConfig,
    [q, k, v]: [Tracked<B, C>; 3],
    slopes: Tracked<B, C>,
    initial_state: Option<Tracked<B, C>>,
    forward: impl FnOnce(&Saved<B>) -> (FloatTensor<B>, Option<FloatTensor<B>>),
) -> (Tracked<B, C>, Option<Tracked<B, C>>)
where
    B: LightningAttentionBackend,
    C: CheckpointStrategy,
{
    // Node guards are taken before the primitives are consumed: they keep the inputs in the graph.
    let nodes = || [q.node(), k.node(), v.node()];
    let state_nodes = initial_state.as_ref().map(|state| (state.node(), state.node()));
    let saved: Saved<B> = (
        q.primitive().clone(),
        k.primitive().clone(),
        v.primitive().clone(),
        slopes.into_primitive(),
        initial_state.map(|t| t.into_primitive()),
    );
    let (out, final_state) = forward(&saved);
    let step = |output| PrefillBackward {
        output,
        call: call.clone(),
        config,
    };
    match state_nodes {
        Some((first, second)) => {
            let [q, k, v] = nodes();
            let out = track::<B, C, 4>(step(Output::Out), [q, k, v, first], &saved, out);
            let final_state = final_state.map(|state| {
                let [q, k, v] = nodes();
                track::<B, C, 4>(step(Output::FinalState), [q, k, v, second], &saved, state)
            });
            (out, final_state)
        }
        None => (
            track::<B, C, 3>(step(Output::Out), nodes(), &saved, out),
            final_state.map(|state| track::<B, C, 3>(step(Output::FinalState), nodes(), &saved, state)),
        ),
    }
}

/// An untracked autodiff tensor holding `tensor`.
fn constant<B: LightningAttentionBackend, C: CheckpointStrategy>(
    tensor: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    <FloatTensor<Autodiff<B, C>>>::new(tensor)
}

/// The inner backend's view of an optional autodiff tensor (its graph dropped).
fn inner<B: LightningAttentionBackend, C: CheckpointStrategy>(
    tensor: OptionalTensor<Autodiff<B, C>>,
) -> OptionalTensor<B> {
    OptionalTensor::new(tensor.into_option().map(|t| t.into_primitive()))
}

impl<B: LightningAttentionBackend, C: CheckpointStrategy> LightningAttentionBackend for Autodiff<B, C> {
    fn lightning_check_prefill(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> Result<()> {
        B::lightning_check_prefill(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            slopes.into_primitive(),
            inner(initial_state),
            config,
        )
    }

    fn lightning_prefill(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, final_state) = forward_tracked::<B, C>(
            Call::Dense,
            config,
            [q, k, v],
            slopes,
            initial_state.into_option(),
            |(q, k, v, slopes, initial_state)| {
                let (out, state) = B::lightning_prefill(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    slopes.clone(),
                    OptionalTensor::new(initial_state.clone()),
                    config,
                );
                (out, Some(state))
            },
        );
        (
            out,
            final_state.expect("the dense forward returns its final state"),
        )
    }

    fn lightning_prefill_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        initial_state: OptionalTensor<Self>,
        d_out: OptionalTensor<Self>,
        d_final_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        // Gradients of gradients are not supported: the results are constants.
        let (dq, dk, dv, d_initial) = B::lightning_prefill_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            slopes.into_primitive(),
            inner(initial_state),
            inner(d_out),
            inner(d_final_state),
            config,
        );
        (
            constant::<B, C>(dq),
            constant::<B, C>(dk),
            constant::<B, C>(dv),
            constant::<B, C>(d_initial),
        )
    }

    fn lightning_check_packed(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        initial_states: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> Result<()> {
        B::lightning_check_packed(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            slopes.into_primitive(),
            cu_seqlens,
            inner(initial_states),
            config,
        )
    }

    fn lightning_prefill_packed(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        initial_states: OptionalTensor<Self>,
        final_states: bool,
        config: PrefillConfig,
    ) -> (FloatTensor<Self>, OptionalTensor<Self>) {
        let (out, final_states) = forward_tracked::<B, C>(
            Call::Packed(cu_seqlens.clone()),
            config,
            [q, k, v],
            slopes,
            initial_states.into_option(),
            |(q, k, v, slopes, initial_states)| {
                let (out, finals) = B::lightning_prefill_packed(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    slopes.clone(),
                    cu_seqlens,
                    OptionalTensor::new(initial_states.clone()),
                    final_states,
                    config,
                );
                (out, finals.into_option())
            },
        );
        (out, OptionalTensor::new(final_states))
    }

    fn lightning_packed_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        initial_states: OptionalTensor<Self>,
        d_out: OptionalTensor<Self>,
        d_final_states: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        OptionalTensor<Self>,
    ) {
        // Gradients of gradients are not supported: the results are constants.
        let (dq, dk, dv, d_initial) = B::lightning_packed_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            slopes.into_primitive(),
            cu_seqlens,
            inner(initial_states),
            inner(d_out),
            inner(d_final_states),
            config,
        );
        (
            constant::<B, C>(dq),
            constant::<B, C>(dk),
            constant::<B, C>(dv),
            OptionalTensor::new(d_initial.into_option().map(constant::<B, C>)),
        )
    }

    fn lightning_check_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cache: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> Result<()> {
        B::lightning_check_decode(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            cache.into_primitive(),
            slopes.into_primitive(),
            slots,
            scale,
        )
    }

    fn lightning_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cache: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, cache) = B::lightning_decode(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            cache.into_primitive(),
            slopes.into_primitive(),
            slots,
            scale,
        );
        (constant::<B, C>(out), constant::<B, C>(cache))
    }
}
