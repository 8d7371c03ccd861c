// The two protocol profiles vfio-mig speaks. Everything that differs between the 2019 design and the merged 5.8 uAPI
// is in this table (vfio-facts §1.3 vs §2.1/§2.3).

export type ProfileName = 'draft-2019' | 'linux-5.8';
export const PROFILES: readonly ProfileName[] = ['draft-2019', 'linux-5.8'];

export type RegName =
  | 'device_state' | 'reserved' | 'pending_bytes' | 'data_offset' | 'data_size'
  | 'start_pfn' | 'page_size' | 'total_pfns' | 'copied_pfns';

export interface RegDef { off: number; width: 4 | 8 }

export interface ProfileDef {
  name: ProfileName;
  /** sizeof(struct vfio_device_migration_info) */
  headerSize: number;
  regionType: number;
  regionSubtype: number;
  regs: Partial<Record<RegName, RegDef>>;
  /** Resume write order: the drafts write data_size before (trapped) data; 5.8 writes data then data_size. */
  resumeOrder: 'size-then-data' | 'data-then-size';
  /** Where guest dirty pages come from: the region's pfn registers (2019) or the type1 container ioctl (5.8). */
  dirtySource: 'region' | 'container';
}

const COMMON: Partial<Record<RegName, RegDef>> = {
  device_state: { off: 0, width: 4 },
  reserved: { off: 4, width: 4 },
  pending_bytes: { off: 8, width: 8 },
  data_offset: { off: 16, width: 8 },
  data_size: { off: 24, width: 8 },
};

export const PROFILE_DEFS: Record<ProfileName, ProfileDef> = {
  'draft-2019': {
    name: 'draft-2019', headerSize: 64, regionType: 2, regionSubtype: 1,
    regs: {
      ...COMMON,
      start_pfn: { off: 32, width: 8 }, page_size: { off: 40, width: 8 },
      total_pfns: { off: 48, width: 8 }, copied_pfns: { off: 56, width: 8 },
    },
    resumeOrder: 'size-then-data', dirtySource: 'region',
  },
  'linux-5.8': {
    name: 'linux-5.8', headerSize: 32, regionType: 3, regionSubtype: 1,
    regs: { ...COMMON }, resumeOrder: 'data-then-size', dirtySource: 'container',
  },
};

/** copied_pfns special values (v5 draft: VFIO_DEVICE_DIRTY_PFNS_NONE / _ALL). */
export const DIRTY_PFNS_NONE = 0n;
export const DIRTY_PFNS_ALL = 0xffff_ffff_ffff_ffffn;

export function profileDef(name: string): ProfileDef {
  const p = (PROFILE_DEFS as Record<string, ProfileDef>)[name];
  if (!p) throw new Error(`unknown profile '${name}' (expected ${PROFILES.join(' or ')})`);
  return p;
}
