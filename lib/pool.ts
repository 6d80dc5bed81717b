/**
 * Reuse of large CPU output buffers. The first touch of freshly allocated memory costs a page
 * fault per page, which for a memory-bound kernel can cost more than the kernel itself. Buffers of
 * at least 1 MiB that the package allocated for op outputs go back to this pool when their tensor
 * is disposed, and the next output of the same size reuses one (kernels that fill every element
 * of their output ask for these; the rest get fresh zeroed memory). Tensors made from the caller's
 * own arrays are never pooled. The pool holds at most RK_CPU_POOL_BYTES bytes (default 1 GiB).
 */
export const POOL_MIN_BYTES = 1 << 20;
const LIMIT = Number(process.env.RK_CPU_POOL_BYTES ?? 2 ** 30);
const free = new Map<number, ArrayBuffer[]>();
const ours = new WeakSet<ArrayBuffer>();
let pooledBytes = 0;

/** Called by the addon for an output buffer that its kernel will overwrite entirely. */
export function acquireHostBuffer(bytes: number): ArrayBuffer {
  const reused = free.get(bytes)?.pop();
  if (reused) {
    pooledBytes -= bytes;
    return reused;
  }
  const fresh = new ArrayBuffer(bytes);
  ours.add(fresh);
  return fresh;
}

/** Hands a disposed tensor's storage back, if the package allocated it and it is whole. */
export function releaseHostBuffer(storage: Float32Array | Uint16Array): void {
  const buf = storage.buffer as ArrayBuffer;
  const bytes = buf.byteLength;
  if (bytes < POOL_MIN_BYTES || !ours.has(buf) || storage.byteOffset !== 0 || storage.byteLength !== bytes) return;
  if (pooledBytes + bytes > LIMIT) return;
  let list = free.get(bytes);
  if (!list) free.set(bytes, (list = []));
  if (list.includes(buf)) return;
  list.push(buf);
  pooledBytes += bytes;
}

export function pooledHostBytes(): number {
  return pooledBytes;
}

/** Drops every pooled buffer (the garbage collector then returns the memory). */
export function clearHostPool(): void {
  free.clear();
  pooledBytes = 0;
}
