/**
 * Reuse of large CPU output buffers. The first touch of freshly allocated memory costs a page
 * fault per page, which for a memory-bound kernel can cost more than the kernel itself. Buffers of
 * at least 1 MiB that the package allocated for op outputs go back to this pool when their tensor
 * is disposed, and the next output of the same size reuses one (kernels that fill every element
 * of their output ask for these; the rest get fresh zeroed memory). Tensors made from the caller's
 * own arrays are never pooled. The pool holds at most RK_CPU_POOL_BYTES bytes (default 1 GiB).
 *
 * A buffer going back to the pool has its memory moved to a new ArrayBuffer (a transfer, no copy),
 * and the old ArrayBuffer is detached: an array read with dataSync() and kept past dispose() then
 * reads as empty instead of showing a later output's data.
 */
export const POOL_MIN_BYTES = 1 << 20;
const LIMIT = Number(process.env.RK_CPU_POOL_BYTES ?? 2 ** 30);
const free = new Map<number, ArrayBuffer[]>();
/** Buffers the pool allocated, which may go back to it. */
const ours = new WeakSet<ArrayBuffer>();
/** Those of `ours` that one tensor wraps; a second tensor over the same buffer takes it out of `ours`. */
const claimed = new WeakSet<ArrayBuffer>();
let pooledBytes = 0;
let allocations = 0;

/** Called by the addon for an output buffer that its kernel will overwrite entirely. */
export function acquireHostBuffer(bytes: number): ArrayBuffer {
  const reused = free.get(bytes)?.pop();
  if (reused) {
    pooledBytes -= bytes;
    return reused;
  }
  const fresh = new ArrayBuffer(bytes);
  allocations++;
  ours.add(fresh);
  return fresh;
}

/**
 * Called for each tensor made over CPU storage. A pool buffer wrapped by a second tensor (e.g.
 * Tensor.from(out.dataSync())) is never pooled, so disposing one cannot take the other's memory.
 */
export function claimHostBuffer(storage: Float32Array | Uint16Array): void {
  const buf = storage.buffer as ArrayBuffer;
  if (!ours.has(buf)) return;
  if (claimed.has(buf)) ours.delete(buf);
  else claimed.add(buf);
}

/** Hands a disposed tensor's storage back, if the package allocated it and it is whole. */
export function releaseHostBuffer(storage: Float32Array | Uint16Array): void {
  const buf = storage.buffer as ArrayBuffer;
  const bytes = buf.byteLength; // 0 once detached, so a buffer is never pooled twice
  if (bytes < POOL_MIN_BYTES || !ours.has(buf) || storage.byteOffset !== 0 || storage.byteLength !== bytes) return;
  if (pooledBytes + bytes > LIMIT) return;
  const moved = structuredClone(buf, { transfer: [buf] });
  ours.add(moved);
  let list = free.get(bytes);
  if (!list) free.set(bytes, (list = []));
  list.push(moved);
  pooledBytes += bytes;
}

/** Keeps a buffer out of the pool for good (its memory now belongs to someone else). */
export function disownHostBuffer(storage: Float32Array | Uint16Array): void {
  ours.delete(storage.buffer as ArrayBuffer);
}

export function pooledHostBytes(): number {
  return pooledBytes;
}

/** How many buffers the pool has allocated so far (reuses do not count); for tests. */
export function hostBufferAllocations(): number {
  return allocations;
}

/** Drops every pooled buffer (the garbage collector then returns the memory). */
export function clearHostPool(): void {
  free.clear();
  pooledBytes = 0;
}
