// ONNX Runtime (onnxruntime-node, CPU execution provider) as a peer of the CPU kernels, and as an
// independent implementation for tests/ort.test.ts. There is no ONNX library for JavaScript here, so
// the models are built in memory with the small protobuf encoder below (the messages and field
// numbers of onnx.proto that these models need).
//
// Every model helper returns null when onnxruntime-node cannot be loaded (ortStatus() says why), so
// that a benchmark prints "ORT not installed" instead of failing; otherwise an object with
//   run(feeds?)  -> Promise of the outputs as { name: Float32Array } (default feeds: random inputs of
//                   the right shapes, drawn once at creation),
//   timeMs(opts) -> Promise of the median milliseconds of run() after warm-up,
//   close()      -> releases the session.
// Sessions use ORT's own async run, intraOpNumThreads = threads, interOpNumThreads = 1 and every
// graph optimisation. Weights are initializers (constants), so ORT may pre-pack them at load time,
// as it does for a deployed model.
import { createRequire } from 'node:module';

// ---------------------------------------------------------------------------------------------
// Loading onnxruntime-node.

let ort = null;
let ortReason = null;
try {
  ort = createRequire(import.meta.url)('onnxruntime-node');
} catch (e) {
  ortReason =
    `onnxruntime-node could not be loaded (${String(e?.message ?? e).split('\n')[0]}); ` +
    'install the dev dependencies with ONNXRUNTIME_NODE_INSTALL=skip npm ci';
}

/** { ok, reason, version, ort }: whether onnxruntime-node loaded, and the module when it did. */
export function ortStatus() {
  return { ok: ort !== null, reason: ortReason, version: ort?.env?.versions?.node ?? null, ort };
}

// ---------------------------------------------------------------------------------------------
// Protobuf encoding (proto3/proto2 wire format): a field is a varint key (field number << 3 | wire
// type) then its payload; wire type 0 = varint, 2 = length-delimited (bytes, strings, sub-messages,
// packed repeated scalars), 5 = 32-bit (float). A message is the concatenation of its fields.

function varint(n) {
  // Non-negative integers only (sizes, enum values, dims, attribute ints used here).
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`ort.mjs: cannot encode ${n} as a varint`);
  const out = [];
  let v = BigInt(n);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return Uint8Array.from(out);
}

function concat(parts) {
  const n = parts.reduce((s, p) => s + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const utf8 = (s) => new TextEncoder().encode(s);
const key = (field, wire) => varint((field << 3) | wire);
/** A varint field. */
const fInt = (field, n) => concat([key(field, 0), varint(n)]);
/** A length-delimited field: bytes, a string or an encoded sub-message. */
const fBytes = (field, bytes) => {
  const b = typeof bytes === 'string' ? utf8(bytes) : bytes;
  return concat([key(field, 2), varint(b.length), b]);
};
/** A 32-bit float field. */
const fFloat = (field, x) => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setFloat32(0, x, true);
  return concat([key(field, 5), b]);
};
/** A packed repeated varint field. */
const fPacked = (field, ns) => fBytes(field, concat(ns.map(varint)));

// onnx.proto enums.
const FLOAT = 1; // TensorProto.DataType.FLOAT
const ATTR = { FLOAT: 1, INT: 2, STRING: 3, FLOATS: 6, INTS: 7 }; // AttributeProto.AttributeType

// TensorProto: dims = 1 (repeated int64), data_type = 2, name = 8, raw_data = 9 (little-endian).
function tensorProto(name, dims, data) {
  const f32 = Float32Array.from(data);
  return concat([
    fPacked(1, dims),
    fInt(2, FLOAT),
    fBytes(8, name),
    fBytes(9, new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength)),
  ]);
}

// ValueInfoProto: name = 1, type = 2 (TypeProto). TypeProto: tensor_type = 1 (TypeProto.Tensor:
// elem_type = 1, shape = 2). TensorShapeProto: dim = 1 (Dimension: dim_value = 1).
function valueInfo(name, dims) {
  const shape = concat(dims.map((d) => fBytes(1, fInt(1, d))));
  const tensorType = concat([fInt(1, FLOAT), fBytes(2, shape)]);
  return concat([fBytes(1, name), fBytes(2, fBytes(1, tensorType))]);
}

// AttributeProto: name = 1, f = 2, i = 3, s = 4, floats = 7, ints = 8, strings = 9, type = 20.
function attribute(name, value) {
  const parts = [fBytes(1, name)];
  if (typeof value === 'string') parts.push(fBytes(4, value), fInt(20, ATTR.STRING));
  else if (Array.isArray(value) && value.every(Number.isInteger)) parts.push(fPacked(8, value), fInt(20, ATTR.INTS));
  else if (Array.isArray(value)) parts.push(...value.map((x) => fFloat(7, x)), fInt(20, ATTR.FLOATS));
  else if (value?.float !== undefined) parts.push(fFloat(2, value.float), fInt(20, ATTR.FLOAT));
  else if (Number.isInteger(value)) parts.push(fInt(3, value), fInt(20, ATTR.INT));
  else parts.push(fFloat(2, value), fInt(20, ATTR.FLOAT));
  return concat(parts);
}

// NodeProto: input = 1, output = 2 (repeated strings; "" = an omitted optional), name = 3,
// op_type = 4, attribute = 5, domain = 7.
function nodeProto({ op, domain = '', inputs, outputs, attrs = {} }) {
  return concat([
    ...inputs.map((s) => fBytes(1, s)),
    ...outputs.map((s) => fBytes(2, s)),
    fBytes(3, `${op}_0`),
    fBytes(4, op),
    ...Object.entries(attrs).map(([k, v]) => fBytes(5, attribute(k, v))),
    ...(domain ? [fBytes(7, domain)] : []),
  ]);
}

/**
 * The bytes of a one-node ModelProto. inputs / outputs: [name, dims] (float32); initializers:
 * [name, dims, data].
 */
export function encodeModel({ node, inputs, outputs, initializers = [] }) {
  // GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12.
  const graph = concat([
    fBytes(1, nodeProto(node)),
    fBytes(2, `${node.op}_graph`),
    ...initializers.map(([n, d, x]) => fBytes(5, tensorProto(n, d, x))),
    ...inputs.map(([n, d]) => fBytes(11, valueInfo(n, d))),
    ...outputs.map(([n, d]) => fBytes(12, valueInfo(n, d))),
  ]);
  // OperatorSetIdProto: domain = 1, version = 2.
  const opset = (domain, version) => concat([...(domain ? [fBytes(1, domain)] : []), fInt(2, version)]);
  // ModelProto: ir_version = 1, producer_name = 2, graph = 7, opset_import = 8.
  return concat([
    fInt(1, 8),
    fBytes(2, 'recurrent-kernels bench'),
    fBytes(7, graph),
    fBytes(8, opset('', 17)),
    fBytes(8, opset('com.microsoft', 1)),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Sessions.

function uniform(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/**
 * A session of one model. defaults: { name: Float32Array } for every graph input (used when run()
 * gets none). Rejects (with ORT's message) when ORT cannot build the model.
 */
async function session(model, defaults, threads) {
  const s = await ort.InferenceSession.create(encodeModel(model), {
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
  const shapes = Object.fromEntries(model.inputs);
  const feedsOf = (values) =>
    Object.fromEntries(
      Object.entries({ ...defaults, ...values }).map(([n, x]) => [n, new ort.Tensor('float32', x, shapes[n])]),
    );
  const run = async (values = {}) => {
    const out = await s.run(feedsOf(values));
    return Object.fromEntries(Object.entries(out).map(([n, t]) => [n, t.data]));
  };
  return {
    run,
    /** Median ms of run() (on the default inputs) over `iters` runs after `warmup` runs. */
    async timeMs({ warmup = 2, iters = 5, reduce = median } = {}) {
      const feeds = feedsOf({});
      for (let i = 0; i < warmup; i++) await s.run(feeds);
      const times = [];
      for (let i = 0; i < iters; i++) {
        const t0 = performance.now();
        await s.run(feeds);
        times.push(performance.now() - t0);
      }
      return reduce(times);
    },
    close: () => s.release(),
  };
}

const threadsOr = (threads) => threads ?? 1;

/**
 * ONNX LSTM (ai.onnx opset 17, layout 0, forward, no peepholes), X [T, B, I], hidden size H.
 * weights: { W [1, 4H, I], R [1, 4H, H], B [1, 8H] } in ONNX's layouts (gates i, o, f, c; B is
 * Wb then Rb); random when absent. initialStates: also take initial_h, initial_c [1, B, H] as inputs.
 * Outputs Y [T, 1, B, H], Y_h and Y_c [1, B, H].
 */
export async function ortLstm({ batch, T, input, hidden, threads, weights = null, initialStates = false }) {
  return ortRnn('LSTM', 4, { batch, T, input, hidden, threads, weights, initialStates });
}

/**
 * ONNX GRU with linear_before_reset = 1 (the form of cuDNN, PyTorch and our GRU), layout 0, forward:
 * X [T, B, I], W [1, 3H, I], R [1, 3H, H], B [1, 6H] (gates z, r, h), initial_h [1, B, H].
 * Outputs Y [T, 1, B, H] and Y_h [1, B, H].
 */
export async function ortGru({ batch, T, input, hidden, threads, weights = null, initialStates = false }) {
  return ortRnn('GRU', 3, { batch, T, input, hidden, threads, weights, initialStates });
}

async function ortRnn(op, G, { batch, T, input: I, hidden: H, threads, weights, initialStates }) {
  if (!ort) return null;
  const s = 1 / Math.sqrt(H);
  const w = weights ?? { W: uniform(G * H * I, -s, s), R: uniform(G * H * H, -s, s), B: uniform(2 * G * H, -0.1, 0.1) };
  const lstm = op === 'LSTM';
  // LSTM inputs: X, W, R, B, sequence_lens, initial_h, initial_c (, P); GRU: X, W, R, B, sequence_lens, initial_h.
  const stateInputs = initialStates ? (lstm ? ['initial_h', 'initial_c'] : ['initial_h']) : [];
  const inputs = [['X', [T, batch, I]], ...stateInputs.map((n) => [n, [1, batch, H]])];
  const outputs = [['Y', [T, 1, batch, H]], ['Y_h', [1, batch, H]], ...(lstm ? [['Y_c', [1, batch, H]]] : [])];
  const defaults = Object.fromEntries(
    inputs.map(([n, d]) => [
      n,
      uniform(
        d.reduce((a, b) => a * b, 1),
        -1,
        1,
      ),
    ]),
  );
  return session(
    {
      node: {
        op,
        inputs: ['X', 'W', 'R', 'B', '', ...stateInputs],
        outputs: outputs.map(([n]) => n),
        attrs: { hidden_size: H, direction: 'forward', ...(lstm ? {} : { linear_before_reset: 1 }) },
      },
      inputs,
      outputs,
      initializers: [
        ['W', [1, G * H, I], w.W],
        ['R', [1, G * H, H], w.R],
        ['B', [1, 2 * G * H], w.B],
      ],
    },
    defaults,
    threadsOr(threads),
  );
}

/**
 * com.microsoft.LinearAttention, CPU. Inputs (packed 3D):
 *   query [B, T, Hq * K], key [B, T, Hk * K], value [B, T, Hkv * V], past_state [B, Hkv, K, V]
 *   (optional; the state is K x V per head, S[i][j] with i over the key dim), decay (the gated rules)
 *   [B, T, Hkv] or [B, T, Hkv * K] per key (log space: S = diag(exp(decay)) S), beta (the delta
 *   rules) [B, T, Hkv] or [B, T, 1].
 * Outputs: output [B, T, max(Hq, Hkv) * V] and present_state [B, Hkv, K, V]. q and k are used as
 * given (no L2 norm inside). Per token (gated_delta): S = diag(exp(g)) S; S += k (beta (v - S^T k))^T;
 * o = scale S^T q; the other rules drop the decay and / or the delta term.
 * Grouped queries (Hq a multiple of Hkv): query head h reads state h / (Hq / Hkv), one output per
 * query head; inverse (Hkv a multiple of Hq): state hv reads query head hv / (Hkv / Hq), one output
 * per state. Key head of state hv: hv / (Hkv / Hk).
 */
export async function ortLinearAttention({
  batch,
  T,
  H,
  HV = H,
  Hk = H,
  K,
  V = K,
  scale = 1 / Math.sqrt(K),
  threads,
  initialState = false,
  rule = 'gated_delta',
  perKey = false,
  betaHeads = HV,
}) {
  if (!ort) return null;
  const decays = rule === 'gated' || rule === 'gated_delta';
  const corrects = rule === 'delta' || rule === 'gated_delta';
  const inputs = [
    ['query', [batch, T, H * K]],
    ['key', [batch, T, Hk * K]],
    ['value', [batch, T, HV * V]],
    ...(initialState ? [['past_state', [batch, HV, K, V]]] : []),
    ...(decays ? [['decay', [batch, T, HV * (perKey ? K : 1)]]] : []),
    ...(corrects ? [['beta', [batch, T, betaHeads]]] : []),
  ];
  return session(
    {
      node: {
        op: 'LinearAttention',
        domain: 'com.microsoft',
        inputs: [
          'query',
          'key',
          'value',
          initialState ? 'past_state' : '',
          decays ? 'decay' : '',
          corrects ? 'beta' : '',
        ],
        outputs: ['output', 'present_state'],
        attrs: { q_num_heads: H, kv_num_heads: HV, update_rule: rule, scale: { float: scale } },
      },
      inputs,
      outputs: [
        ['output', [batch, T, Math.max(H, HV) * V]],
        ['present_state', [batch, HV, K, V]],
      ],
    },
    linearDefaults(inputs, K),
    threadsOr(threads),
  );
}

/**
 * com.microsoft.CausalConvWithState, CPU: input [B, C, T] (channelsLast: [B, T, C]), weight [C, 1, K],
 * bias [C] (optional), past_state [B, C, L] (channelsLast: [B, L, C]; optional), L = (K - 1) * dilation;
 * outputs output (as input) and present_state (as past_state). activation 'silu' or 'none'.
 */
export async function ortCausalConv({
  batch,
  C,
  T,
  K,
  dilation = 1,
  activation = 'none',
  channelsLast = false,
  bias = true,
  initialState = false,
  threads,
}) {
  if (!ort) return null;
  const L = (K - 1) * dilation;
  const xShape = channelsLast ? [batch, T, C] : [batch, C, T];
  const sShape = channelsLast ? [batch, L, C] : [batch, C, L];
  const inputs = [
    ['input', xShape],
    ['weight', [C, 1, K]],
    ...(bias ? [['bias', [C]]] : []),
    ...(initialState ? [['past_state', sShape]] : []),
  ];
  const defaults = Object.fromEntries(
    inputs.map(([n, sh]) => [
      n,
      uniform(
        sh.reduce((a, b) => a * b, 1),
        -1,
        1,
      ),
    ]),
  );
  return session(
    {
      node: {
        op: 'CausalConvWithState',
        domain: 'com.microsoft',
        inputs: ['input', 'weight', bias ? 'bias' : '', initialState ? 'past_state' : ''],
        outputs: ['output', 'present_state'],
        attrs: { activation, dilation, ...(channelsLast ? { channels_last: 1 } : {}) },
      },
      inputs,
      outputs: [
        ['output', xShape],
        ['present_state', sShape],
      ],
    },
    defaults,
    threadsOr(threads),
  );
}

/** Random linear-attention inputs under ORT's names and shapes: q, k rows of unit norm, decays log-sigmoid-like, beta in (0, 1). */
function linearDefaults(inputs, K) {
  const unitRows = (x, n) => {
    for (let r = 0; r < x.length / n; r++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += x[r * n + i] ** 2;
      for (let i = 0; i < n; i++) x[r * n + i] /= Math.sqrt(s);
    }
    return x;
  };
  const size = (shape) => shape.reduce((a, b) => a * b, 1);
  const out = {};
  for (const [name, shape] of inputs) {
    const n = size(shape);
    if (name === 'query' || name === 'key') out[name] = unitRows(uniform(n, -1, 1), K);
    else if (name === 'value') out[name] = uniform(n, -1, 1);
    else if (name === 'decay') out[name] = Float32Array.from(uniform(n, -4.9, 6), (x) => -Math.log1p(Math.exp(-x)));
    else if (name === 'beta') out[name] = Float32Array.from(uniform(n, -4, 4), (x) => 1 / (1 + Math.exp(-x)));
    else if (name === 'past_state') out[name] = uniform(n, -0.1, 0.1);
  }
  return out;
}

/** Random gated-delta inputs under ORT's names: q, k of unit norm per head, g log-sigmoid-like, beta in (0, 1). */
function gdnDefaults(batch, T, H, HV, K, V, initialState) {
  const unitRows = (x, n) => {
    for (let r = 0; r < x.length / n; r++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += x[r * n + i] ** 2;
      for (let i = 0; i < n; i++) x[r * n + i] /= Math.sqrt(s);
    }
    return x;
  };
  const nh = batch * T * HV;
  return {
    query: unitRows(uniform(batch * T * H * K, -1, 1), K),
    key: unitRows(uniform(batch * T * H * K, -1, 1), K),
    value: uniform(batch * T * HV * V, -1, 1),
    decay: Float32Array.from(uniform(nh, -4.9, 6), (x) => -Math.log1p(Math.exp(-x))),
    beta: Float32Array.from(uniform(nh, -4, 4), (x) => 1 / (1 + Math.exp(-x))),
    ...(initialState ? { past_state: uniform(batch * HV * K * V, -0.1, 0.1) } : {}),
  };
}

/**
 * com.microsoft.GatedDeltaNet, when this ORT has a kernel for it on the CPU execution provider:
 * { session, reason: null }, else { session: null, reason } (onnxruntime-node 1.31 implements it
 * for the CUDA and WebGPU execution providers only). Contract (ORT's schema): inputs query, key,
 * value, cu_seqlens, decay, beta, initial_state, ...; q, k [B, T, H, K] and v [B, T, HV, V] (head
 * counts come from the shapes, no attributes), decay and beta [B, T, HV], the state V-major
 * [B, HV, V, K] (the transpose of LinearAttention's); outputs output [B, T, HV, V], final_state.
 */
export async function ortGatedDeltaNet({ batch, T, H, HV = H, K, V = K, scale = 1 / Math.sqrt(K), threads }) {
  if (!ort) return { session: null, reason: ortReason };
  const d = gdnDefaults(batch, T, H, HV, K, V, false);
  try {
    const s = await session(
      {
        node: {
          op: 'GatedDeltaNet',
          domain: 'com.microsoft',
          inputs: ['query', 'key', 'value', '', 'decay', 'beta', 'initial_state'],
          outputs: ['output', 'final_state'],
          attrs: { update_rule: 'gated_delta', scale: { float: scale } },
        },
        inputs: [
          ['query', [batch, T, H, K]],
          ['key', [batch, T, H, K]],
          ['value', [batch, T, HV, V]],
          ['decay', [batch, T, HV]],
          ['beta', [batch, T, HV]],
          ['initial_state', [batch, HV, V, K]],
        ],
        outputs: [
          ['output', [batch, T, HV, V]],
          ['final_state', [batch, HV, V, K]],
        ],
      },
      { ...d, initial_state: new Float32Array(batch * HV * K * V) },
      threadsOr(threads),
    );
    return { session: s, reason: null };
  } catch (e) {
    return { session: null, reason: `GatedDeltaNet: ${String(e?.message ?? e).split('\n')[0]}` };
  }
}

// ---------------------------------------------------------------------------------------------
// Machine ceilings.

/**
 * { gflops, copyGBs, reason }: the fp32 multiply-add rate of this machine as ORT's MatMul
 * (2048 x 2048 x 2048, best of several runs, `threads` threads) in GFLOP/s, and the copy bandwidth
 * of one thread (Float32Array.prototype.set of 256 MB, best of several, bytes read + written) in
 * GB/s. gflops is null (with the reason) when ORT is not available.
 */
/** Median ms of an ORT session from this module (closed afterwards): about 2 s of runs at most. */
export async function ortMedianMs(session) {
  try {
    const once = await session.timeMs({ warmup: 1, iters: 1 });
    const iters = Math.max(3, Math.min(20, Math.floor(2000 / Math.max(once, 1e-3))));
    return await session.timeMs({ warmup: 0, iters });
  } finally {
    await session.close();
  }
}

export async function machineCeilings(threads) {
  const n = 64 * 1024 * 1024;
  const src = new Float32Array(n).fill(1),
    dst = new Float32Array(n);
  let best = Infinity;
  for (let i = 0; i < 6; i++) {
    const t0 = performance.now();
    dst.set(src);
    if (i > 0) best = Math.min(best, performance.now() - t0); // the first run faults dst's pages in
  }
  const copyGBs = (2 * n * 4) / (best * 1e6);
  if (!ort) return { gflops: null, copyGBs, reason: ortReason };
  const N = 2048;
  const s = await session(
    {
      node: { op: 'MatMul', inputs: ['A', 'B'], outputs: ['C'] },
      inputs: [['A', [N, N]]],
      outputs: [['C', [N, N]]],
      initializers: [['B', [N, N], uniform(N * N, -1, 1)]],
    },
    { A: uniform(N * N, -1, 1) },
    threadsOr(threads),
  );
  const ms = await s.timeMs({ warmup: 2, iters: 5, reduce: (xs) => Math.min(...xs) });
  await s.close();
  return { gflops: (2 * N ** 3) / (ms * 1e6), copyGBs, reason: null };
}
