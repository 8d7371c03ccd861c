// Worker-side data path of a v1 device: its migration region, whatever the reach (the emulated vendor's region, a
// kernel device fd's region, a vfio-user server's region with its sparse areas mapped). Imported in workers only,
// by URL (V1_REGION_PATH): it reuses the worker's region loops, which keep the hot paths of v1 — zero-copy save (the
// record written straight from the mmap'd data area, region.sendRecord), zero-copy load from the stream file into
// the data area, several lanes per device, vendor-mode checks and the profile's write order.
import { ErrorCode, MigError } from '../../errors.js';
import type { DataPath, DataPathDesc, ReadResult } from '../../device/seam.js';
import { MigrationRegion, type RegionDesc } from '../migration-region.js';
import { load, loadData, save } from '../../../workers/worker.js';
import type { LoadDataPathTask, LoadPathTask, LoadResult, SavePathTask, SaveResult } from '../../../workers/tasks.js';

export interface V1PathParams { region: RegionDesc }

export default function regionPath(desc: DataPathDesc): DataPath {
  const { region: rd } = desc.params as V1PathParams;
  const region = new MigrationRegion(rd);
  return {
    /** One step (pending_bytes, data_offset, data_size, copy): pending 0 ends the phase, data_size 0 ends it for now. */
    read(dst: Uint8Array, at: number, max: number, phase: 'precopy' | 'stopcopy'): ReadResult {
      const c = region.nextChunk(max);
      if (c.size > 0) region.copyOut(c.dataOffset, c.size, dst, at);
      const status = c.size > 0 ? 'data' : c.pending === 0n && phase === 'stopcopy' ? 'end' : 'later';
      return { status, n: c.size, pending: Number(c.pending) };
    },
    write(src: Uint8Array, at: number, n: number, streamOffset: number): void {
      try {
        region.loadChunk(src, at, n);
      } catch (e) {
        throw new MigError(ErrorCode.LOAD_REJECTED, `destination rejected the data at stream offset ${streamOffset}: ${(e as Error).message}`,
          { device: desc.device, offset: streamOffset, errno: (e as MigError).errno, cause: e });
      }
    },
    save(t: SavePathTask): SaveResult {
      return save({
        ...t, op: 'save', region: rd, vendorMode: t.vendorMode ?? 'compatible', maxEmptyChunks: t.maxEmptyChunks ?? 64,
        maxNoProgress: t.maxNoProgress ?? 256, lane: t.lane ?? 0, lanes: t.lanes ?? 1,
      });
    },
    load(t: LoadPathTask): LoadResult { return load({ ...t, op: 'load', region: rd, config: t.config }); },
    loadFromFile(t: LoadDataPathTask): LoadResult | null { return loadData({ ...t, op: 'load-data', region: rd }); },
  };
}
