// Inputs that used to abort the process, corrupt memory or return silently wrong values must end in a
// typed RecurrentKernelsError. Each case runs in its own child process, so that a regression shows as
// a crash of that child (a failed test) rather than taking the test runner down.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { expectError } from './helpers';

const entry = join(__dirname, '..', 'dist', 'cjs', 'index.js');

// Runs `body` (which may use rk, T(shape) for a tensor of 0.1s, and detach(typedArray)) in a fresh
// Node process and returns what it threw: { name, code, message }, or { none: true }.
function outcome(body: string): { name?: string; code?: string; message?: string; none?: boolean } {
  const script = `
    const rk = require(${JSON.stringify(entry)});
    const T = (s) => rk.Tensor.from(new Float32Array(s.reduce((a, b) => a * b)).fill(0.1), s);
    const detach = (a) => { structuredClone(a.buffer, { transfer: [a.buffer] }); };
    let result;
    try { ${body}; result = { none: true }; }
    catch (e) { result = { name: e?.constructor?.name, code: e?.code, message: String(e?.message) }; }
    console.log('RESULT ' + JSON.stringify(result));`;
  const r = spawnSync(process.execPath, ['-e', script], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  const line = r.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  if (r.status !== 0 || !line)
    throw new Error(`child exited with status ${r.status} (signal ${r.signal}):\n${r.stderr.slice(-2000)}`);
  return JSON.parse(line.slice(7));
}

// A gated delta rule call made through the raw native function, with tensors built by `tensors`.
const rawDelta = (tensors: string, extra = '') => `
  const n = rk.internals.native();
  const s = (k) => new Float32Array(k).fill(0.1);
  const q = s(8), k = s(8), v = s(8), g = s(2), beta = s(2);
  ${extra}
  n.gatedDeltaRuleForward({ device: 'cpu', dtype: 'float32', tensors: ${tensors},
    config: { batch: 1, T: 2, H: 1, HV: 1, K: 4, V: 4, scale: 0.5, l2norm: false, cuSeqlens: null, returnFinal: false,
      keepStates: true } });`;

describe('process-level hardening (each case in a child process)', () => {
  it('C1: an output too large to allocate is ERR_OUT_OF_MEMORY, not an abort', () => {
    const r = outcome(`rk.gatedDeltaRule({ q: T([1,1,1,256]), k: T([1,1,1,256]), v: T([1,1,64,256]), g: T([1,1,64]),
      beta: T([1,1,64]) }, { cuSeqlens: new Int32Array(100001), outputFinalState: true })`);
    expect(r).toMatchObject({ name: 'OutOfMemoryError', code: 'ERR_OUT_OF_MEMORY' });
    const s = outcome(`rk.selectiveScan({ u: T([1,4096,2]), delta: T([1,4096,2]), A: T([4096,16]), B: T([1,16,2]),
      C: T([1,16,2]) }, { cuSeqlens: new Int32Array(1000001), returnFinalState: true })`);
    expect(s).toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
  });

  it('C2: a native call claiming a huge batch is a typed error, not std::terminate', () => {
    const r = outcome(`const n = rk.internals.native();
      n.selectiveScanBackward({ device: 'cpu', dtype: 'float32', tensors: { u: new Float32Array(4),
        delta: new Float32Array(4), A: new Float32Array(1), B: new Float32Array(4), C: new Float32Array(4) },
        config: { batch: 2 ** 31, dim: 1, seqlen: 2, dstate: 1, groups: 1, variableB: true, variableC: true,
          deltaSoftplus: false, cuSeqlens: null, needDh0: false },
        grads: { states: new Float32Array(1), dy: new Float32Array(4) } })`);
    expect(r.none).toBeUndefined();
    expect(r.code).toMatch(/^ERR_/);
  });

  it('C3: a buffer source that detaches an input is ERR_DISPOSED', () => {
    const r = outcome(
      rawDelta(
        '{ q, k, v, g, beta, h0: null }',
        `n.setBufferSource((bytes) => { detach(q); return new ArrayBuffer(bytes); }, 0);`,
      ),
    );
    expect(r).toMatchObject({ code: 'ERR_DISPOSED' });
    expect(r.message).toMatch(/q was detached/);
  });

  it('C4: a getter that detaches an input read before it is ERR_DISPOSED', () => {
    const r = outcome(rawDelta('{ q, k, get v() { detach(q); return v; }, g, beta, h0: null }'));
    expect(r).toMatchObject({ code: 'ERR_DISPOSED' });
  });

  it('C5: a buffer source that detaches an output it handed out earlier in the call is ERR_DISPOSED', () => {
    const r = outcome(
      rawDelta(
        '{ q, k, v, g, beta, h0: null }',
        `let first = null;
       n.setBufferSource((bytes) => { const b = new ArrayBuffer(bytes);
         if (first) structuredClone(first, { transfer: [first] }); else first = b; return b; }, 0);`,
      ),
    );
    expect(r).toMatchObject({ code: 'ERR_DISPOSED' });
    expect(r.message).toMatch(/an output was detached/);
  });

  it('a setter on Object.prototype for an output name cannot free that output', () => {
    const r = outcome(
      rawDelta(
        '{ q, k, v, g, beta, h0: null }',
        `Object.defineProperty(Object.prototype, 'o', { set(x) { detach(x); }, configurable: true });`,
      ),
    );
    expect(r).toMatchObject({ code: 'ERR_DISPOSED' });
  });

  it('S1: a scale that is finite as a double but not as a float32 is ERR_ARGUMENT', () => {
    for (const call of ['gatedDeltaRule', 'gatedDeltaRuleStep']) {
      const state = call === 'gatedDeltaRuleStep' ? 'state: T([1,1,4,4]),' : '';
      const r = outcome(`rk.${call}({ ${state} q: T([1,2,1,4]), k: T([1,2,1,4]), v: T([1,2,1,4]), g: T([1,2,1]),
        beta: T([1,2,1]) }, { scale: 1e39 })`);
      expect(r).toMatchObject({ code: 'ERR_ARGUMENT' });
      expect(r.message).toMatch(/scale/);
    }
  });

  it('the same calls with nothing detached still run', () => {
    expect(outcome(rawDelta('{ q, k, v, g, beta, h0: null }'))).toEqual({ none: true });
  });
});

describe('raw native functions: typed errors that name the argument', () => {
  it('an argument that should be an object is named', async () => {
    const rk = await import('../lib/index');
    const n = rk.internals.native() as unknown as Record<string, (...a: unknown[]) => unknown>;
    expectError(
      () => n.selectiveStateUpdate('cpu', 'float32', 5, {}),
      'ERR_ARGUMENT',
      /argument 1 \(request\) must be an object/,
    );
    expectError(
      () => n.selectiveStateUpdate({ device: 'cpu', dtype: 'float32', tensors: 5, config: {} }),
      'ERR_ARGUMENT',
      /request.tensors must be an object/,
    );
    expectError(
      () => n.gatedDeltaRuleForward({ device: 'cpu', dtype: 'float32', tensors: {}, config: null }),
      'ERR_ARGUMENT',
      /request.config must be an object/,
    );
    expectError(
      () => n.fusedRnnBackward({ device: 'cpu', dtype: 'float32', tensors: {}, config: { cell: 1 } }),
      'ERR_ARGUMENT',
      /request.grads must be an object/,
    );
    expectError(
      () => n.fusedRnnBackward({ device: 'cpu', dtype: 'float32', tensors: {}, config: { cell: 'lstm' }, grads: [1] }),
      'ERR_ARGUMENT',
      /must be|has|expected/,
    );
  });

  it('detached storage is ERR_DISPOSED, not a size mismatch', async () => {
    const rk = await import('../lib/index');
    const n = rk.internals.native();
    const s = (k: number) => new Float32Array(k).fill(0.1);
    const q = s(8);
    structuredClone(q.buffer, { transfer: [q.buffer] });
    expectError(
      () =>
        n.gatedDeltaRuleForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { q, k: s(8), v: s(8), g: s(2), beta: s(2), h0: null },
          config: {
            batch: 1,
            T: 2,
            H: 1,
            HV: 1,
            K: 4,
            V: 4,
            scale: 0.5,
            l2norm: false,
            cuSeqlens: null,
            returnFinal: false,
            keepStates: true,
          },
        }),
      'ERR_DISPOSED',
      /q storage is detached/,
    );
  });

  it('DeviceBuffer: a bad size or a call without new is a typed error', async () => {
    const rk = await import('../lib/index');
    const DB = rk.internals.native().DeviceBuffer as unknown as (b: unknown) => { dispose(): void };
    expectError(() => new (DB as unknown as new (b: unknown) => unknown)(-1), 'ERR_ARGUMENT', /bytes must be/);
    expectError(() => DB('x'), 'ERR_ARGUMENT', /bytes must be/);
    // Without new: a buffer where CUDA works, else the typed reason.
    if (rk.cuda.available()) DB(16).dispose();
    else expectError(() => DB(16), 'ERR_DEVICE', /CUDA/);
  });
});
