// The device link model's options: presets and custom parameters, validated before anything
// reaches the addon. The model itself is native/engine/link.{h,cc}; docs/link-model.md explains it,
// cites each preset's figures and shows the validation.
import { checkOneOf, rangeError, typeError } from './errors.js';
import { checkNumber } from './validate.js';

/**
 * The parameters of an interconnect between host memory and a device. Every field is optional; a
 * field left out costs nothing (a bandwidth left out is unlimited), so `{}` is a zero-cost link.
 * Each charge is rounded to whole nanoseconds (docs/link-model.md gives the formulas).
 */
export interface LinkParams {
  /** Fixed cost of one transfer (one migration call, one eviction, one writeback run), in µs. @default 0 */
  latencyUs?: number;
  /** Host-to-device bandwidth in GB/s (10^9 bytes/s), > 0. Default unlimited. */
  bandwidthGBs?: number;
  /** Device-to-host bandwidth in GB/s, > 0. Default `bandwidthGBs`. */
  toHostBandwidthGBs?: number;
  /**
   * Transfer-size curve, per KiB: a transfer of s bytes runs at
   * `bandwidth × (2/π) × atan(curvePerKiB × s / 1024)` (the fitted PCIe 3.0 x16 curve has 0.07292).
   * 0: flat, every transfer at the full bandwidth. @default 0
   */
  curvePerKiB?: number;
  /** One device fault round (a batch of faults serviced, then replayed): the far-fault service time, in µs. @default 0 */
  faultRoundUs?: number;
  /** Each device access to a page that stays in host memory (mapped remotely), in ns. @default 0 */
  remoteAccessNs?: number;
  /** Bandwidth of those remote accesses' bytes, in GB/s, > 0. Default `bandwidthGBs`. */
  remoteBandwidthGBs?: number;
}

/** The presets' names, each documented with its sources in docs/link-model.md. */
export type LinkPreset = 'pcie3x16' | 'pcie4x16' | 'pcie5x16' | 'nvlink-c2c' | 'cxl';

/**
 * A link: a preset's name, or parameters (optionally starting from a preset with `preset`, whose
 * fields the others override).
 */
export type LinkOptions = LinkPreset | (LinkParams & { preset?: LinkPreset });

// The small-transfer limit of the PCIe 3.0 fit: BW(s) ≈ bw·(2/π)·k·s/1024, so a transfer costs at
// least 1024 / (12e9 · (2/π) · 0.07292) s ≈ 1.84 µs. Links without a published size curve get it as
// their fixed per-transfer cost (a DMA's setup does not shrink with the lane rate).
const PCIE_SETUP_US = 1.84;
// GPGPU-Sim's UVM model: 66,645 core cycles at 1481 MHz (GTX 1080 Ti) per far fault.
const FAR_FAULT_US = 45;

/**
 * The presets' parameters (frozen). Sources: docs/link-model.md. The far-fault round is the
 * driver's service time, measured on PCIe 3.0; the other links keep it, for want of a published
 * figure of their own.
 */
export const LINK_PRESETS: Readonly<Record<LinkPreset, Readonly<Required<Omit<LinkParams, 'toHostBandwidthGBs' | 'remoteBandwidthGBs'>>>>> = Object.freeze({
  pcie3x16: Object.freeze({ latencyUs: 0, bandwidthGBs: 12, curvePerKiB: 0.07292, faultRoundUs: FAR_FAULT_US, remoteAccessNs: 0 }),
  pcie4x16: Object.freeze({ latencyUs: PCIE_SETUP_US, bandwidthGBs: 32, curvePerKiB: 0, faultRoundUs: FAR_FAULT_US, remoteAccessNs: 0 }),
  pcie5x16: Object.freeze({ latencyUs: PCIE_SETUP_US, bandwidthGBs: 64, curvePerKiB: 0, faultRoundUs: FAR_FAULT_US, remoteAccessNs: 0 }),
  'nvlink-c2c': Object.freeze({ latencyUs: PCIE_SETUP_US, bandwidthGBs: 450, curvePerKiB: 0, faultRoundUs: FAR_FAULT_US, remoteAccessNs: 0 }),
  cxl: Object.freeze({ latencyUs: PCIE_SETUP_US, bandwidthGBs: 64, curvePerKiB: 0, faultRoundUs: FAR_FAULT_US, remoteAccessNs: 0 }),
});

const PRESET_NAMES = Object.keys(LINK_PRESETS) as LinkPreset[];
const COST_FIELDS = ['latencyUs', 'curvePerKiB', 'faultRoundUs', 'remoteAccessNs'] as const;
const BANDWIDTH_FIELDS = ['bandwidthGBs', 'toHostBandwidthGBs', 'remoteBandwidthGBs'] as const;
const FIELDS: readonly string[] = ['preset', ...COST_FIELDS, ...BANDWIDTH_FIELDS];
// Bounds: large enough for any real link, small enough that a cost in ns stays exact in a double.
const MAX_COST = 1e9;
const MAX_BANDWIDTH = 1e6;

/**
 * Resolves a link option to the parameters the engine takes (every field a finite number), or
 * undefined for no link.
 *
 * @throws {TypeError} `ERR_INVALID_ARG_VALUE` for an unknown preset (the message lists them) or an
 *   unknown field, `ERR_INVALID_ARG_TYPE` for a wrong type; {RangeError} `ERR_OUT_OF_RANGE` for a
 *   negative, NaN or infinite number, or a bandwidth of 0.
 */
export function resolveLink(name: string, value: unknown): Required<LinkParams> | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'string') return resolveLink(name, { preset: value });
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a preset name (${PRESET_NAMES.join(', ')}) or an object of link parameters`);
  const o = value as Record<string, unknown>;
  for (const key of Object.keys(o))
    if (!FIELDS.includes(key)) throw typeError('ERR_INVALID_ARG_VALUE', `${name}.${key} is not a link parameter (${FIELDS.join(', ')})`);
  const base: LinkParams = o.preset === undefined ? {} : LINK_PRESETS[checkOneOf(`${name}.preset`, o.preset, PRESET_NAMES)];
  const pick = (key: keyof LinkParams): unknown => (o[key] !== undefined ? o[key] : base[key]);
  const out = { latencyUs: 0, bandwidthGBs: 0, toHostBandwidthGBs: 0, curvePerKiB: 0, faultRoundUs: 0, remoteAccessNs: 0, remoteBandwidthGBs: 0 };
  for (const key of COST_FIELDS) {
    const v = pick(key);
    if (v !== undefined) out[key] = checkNumber(`${name}.${key}`, v, 0, MAX_COST);
  }
  for (const key of BANDWIDTH_FIELDS) {
    const v = pick(key);
    if (v === undefined) continue;
    // 0 would mean "no bytes ever arrive": refused rather than read as unlimited (leave it out).
    out[key] = checkNumber(`${name}.${key}`, v, 0, MAX_BANDWIDTH);
    if (out[key] === 0) throw rangeError('ERR_OUT_OF_RANGE', `${name}.${key} must be > 0 (leave it out for an unlimited link)`);
  }
  return out;
}
