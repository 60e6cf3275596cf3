//! Rotary position embedding (rotate-half, as HF `apply_rotary_pos_emb`), launched by
//! `rope_wgpu` in engine/src/kernels/rope.rs.
//!
//! Reads a projection `[batch, seq, heads, head_dim]` and writes it head-major
//! `[batch, heads, seq, head_dim]`, rotated: one launch for what the plain-tensor reference does
//! with a transpose copy, a negation, a concatenation and three elementwise ops.

// Keep in sync with `RopeParams` in engine/src/kernels/rope.rs.
struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
/// `[seq, head_dim]`, the frequencies repeated over both halves.
@group(0) @binding(1) var<storage, read_write> cos_table: array<f32>;
@group(0) @binding(2) var<storage, read_write> sin_table: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // One output element per thread; workgroups spread over x and y (see `grid_for`).
    let i = (wg.x + wg.y * 65535u) * 64u + lid;
    let hd = params.head_dim;
    if (i >= params.batch * params.heads * params.seq * hd) {
        return;
    }
    let d = i % hd;
    let s = (i / hd) % params.seq;
    let h = (i / (hd * params.seq)) % params.heads;
    let b = i / (hd * params.seq * params.heads);
    let src = ((b * params.seq + s) * params.heads + h) * hd;
    let half = hd / 2u;
    var rotated: f32;
    if (d < half) {
        rotated = -x[src + d + half];
    } else {
        rotated = x[src + d - half];
    }
    y[i] = x[src + d] * cos_table[s * hd + d] + rotated * sin_table[s * hd + d];
}
