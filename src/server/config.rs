//! The virtio-blk device as the guest sees it: feature bits, the configuration space
//! (`struct virtio_blk_config`, little-endian) and the limits requests are checked against.

use super::request::Limits;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of `struct virtio_blk_config` we implement: everything up to and including
/// `write_zeroes_may_unmap` plus its padding (secure erase and zoned fields are not offered).
/// libblkio insists on exactly this size; QEMU asks for a prefix of it.
pub const CONFIG_LEN: usize = 60;

/// Largest single data segment we accept (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes range, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Ranges per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;

/// Offset of the `wce` (writeback) byte, the only field the driver may write.
const WCE_OFFSET: usize = 32;

/// What the device exposes; fixed for the life of a connection except `writeback`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Disk size in bytes (rounded down to whole sectors when advertised).
    pub capacity: u64,
    /// Logical block size advertised in `blk_size` (512 or 4096).
    pub block_size: u32,
    pub read_only: bool,
    /// The disk supports discard; enables DISCARD and WRITE_ZEROES.
    pub discard: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Write-back cache visible to the guest (it then sends FLUSH). Guests may switch it off
    /// through the `wce` field; the server then flushes after every write.
    pub writeback: bool,
}

impl DeviceConfig {
    /// Most data descriptors per request (advertised as `seg_max`): the queue size minus the
    /// header and status descriptors, as QEMU does.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// virtio feature bits offered to the frontend.
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else if self.discard {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// vhost-user protocol features offered.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Requests in flight survive a crash of the server (`inflight`).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// The whole configuration space.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&(self.capacity / 512).to_le_bytes());
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, self.seg_max());
        // geometry (16..20) stays zero: VIRTIO_BLK_F_GEOMETRY is not offered.
        put32(&mut c, 20, self.block_size);
        c[24] = 0; // physical_block_exp: physical == logical block
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in logical blocks
        put32(&mut c, 28, 0); // opt_io_size: no preference
        c[WCE_OFFSET] = u8::from(self.writeback);
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        if self.discard && !self.read_only {
            put32(&mut c, 36, MAX_DISCARD_SECTORS);
            put32(&mut c, 40, MAX_DISCARD_SEG);
            put32(&mut c, 44, self.block_size / 512);
            put32(&mut c, 48, MAX_DISCARD_SECTORS);
            put32(&mut c, 52, MAX_DISCARD_SEG);
            c[56] = 1; // write_zeroes_may_unmap
        }
        c
    }

    /// Answer to GET_CONFIG: exactly `size` bytes from `offset`, or an empty vector (which the
    /// vhost-user layer turns into an error reply) if the range is outside the config space.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (off, size) = (offset as usize, size as usize);
        match off.checked_add(size) {
            Some(end) if end <= CONFIG_LEN && size > 0 => self.encode()[off..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// SET_CONFIG: only `wce` is writable. Returns false for anything else (left unchanged).
    pub fn write(&mut self, offset: u32, data: &[u8]) -> bool {
        if offset as usize == WCE_OFFSET && data.len() == 1 {
            self.writeback = data[0] != 0;
            return true;
        }
        false
    }

    /// What requests are validated against.
    pub fn limits(&self) -> Limits {
        let discard = self.discard && !self.read_only;
        Limits {
            capacity: self.capacity / 512 * 512,
            read_only: self.read_only,
            seg_max: self.seg_max(),
            size_max: SIZE_MAX,
            discard,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
        }
    }
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeviceConfig {
        DeviceConfig {
            capacity: (1 << 30) + 700,
            block_size: 4096,
            read_only: false,
            discard: true,
            num_queues: 3,
            queue_size: 256,
            writeback: true,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn encodes_virtio_blk_config_layout() {
        let c = cfg().encode();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512 + 1
        );
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(c[32], 1, "write-back cache must be visible");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&c, 44), 8);
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn features_follow_the_disk() {
        let f = cfg().features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);

        let ro = DeviceConfig {
            read_only: true,
            ..cfg()
        };
        let f = ro.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro.encode()[36..57], [0u8; 21]);

        let nodiscard = DeviceConfig {
            discard: false,
            ..cfg()
        };
        assert_eq!(nodiscard.features() & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert!(!nodiscard.limits().discard);
    }

    #[test]
    fn get_config_answers_exactly_the_size_asked() {
        let c = cfg();
        let full = c.encode();
        // libblkio / cloud-hypervisor (60), QEMU (57), the capacity alone.
        for size in [60u32, 57, 8, 1] {
            assert_eq!(c.read(0, size), full[..size as usize]);
        }
        assert_eq!(c.read(32, 1), [1]);
        assert!(c.read(0, 61).is_empty());
        assert!(c.read(59, 2).is_empty());
        assert!(c.read(0, 0).is_empty());
        assert!(c.read(u32::MAX, 2).is_empty());
        assert!(c.read(0x100, 60).is_empty());
    }

    #[test]
    fn only_wce_is_writable() {
        let mut c = cfg();
        assert!(c.write(32, &[0]));
        assert!(!c.writeback);
        assert_eq!(c.read(32, 1), [0]);
        assert!(!c.write(0, &[0; 8]));
        assert!(!c.write(32, &[1, 1]));
        assert_eq!(c.capacity, cfg().capacity);
    }
}
