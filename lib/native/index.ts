/** The native addon: its binding types (addon.ts) and the loader (load.ts). */
export * from './addon';
export * from './load';
