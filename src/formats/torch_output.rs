//! Writing PyTorch zip-format checkpoints (`.bin/.pt/.pth`) that `torch.load(weights_only=True)`
//! and `torch.load(mmap=True)` read natively. An archive holds, in this order,
//! `archive/data.pkl` (the state dict, pickle protocol 2, built here from names, dtypes and
//! shapes alone), `archive/byteorder` (`little`), `archive/data/0..N-1` (one storage per
//! tensor, raw little-endian bytes) and `archive/version` (`3`); every entry is stored and its
//! data 64-byte aligned as torch aligns it, so a mapping can serve the storages in place.
//!
//! The pickle is what `torch.save` emits for an `OrderedDict` of contiguous tensors, opcode for
//! opcode and memo slot for memo slot: `_rebuild_tensor_v2` over a typed storage
//! (`torch.FloatStorage`, ...) for the classic dtypes, `_rebuild_tensor_v3` over
//! `torch.storage.UntypedStorage` plus a dtype global for those torch added later (unsigned
//! 16/32/64-bit, float8). It is written by a small emitter for exactly that shape, not a general
//! serializer. Dtypes torch has no type for are refused naming the tensor.
//!
//! [`Archive`] lays one file out; the atomic writing (one file, or a Hugging Face directory of
//! `pytorch_model*.bin` shards and an index) is [`super::output::Writer`]'s.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::dtype::TorchStorage;

use super::output::OutputTensor;
use super::zip::{self, Layout};
use super::FormatError;

/// The folder every entry of the archive sits in. `torch.save` uses the target's file stem
/// (`archive` for a buffer); a fixed name makes the bytes independent of the file name.
pub const ARCHIVE_PREFIX: &str = "archive";
/// Contents of `archive/version`: the file format version current torch writes.
const VERSION: &[u8] = b"3\n";
/// Contents of `archive/byteorder`: storages are little-endian.
const BYTEORDER: &[u8] = b"little";
/// Alignment of every entry's data, as torch's `storage_alignment` default.
const ALIGN: u64 = 64;
/// Items per `SETITEMS` batch, as Python's pickler batches them.
const BATCH: usize = 1000;

/// Row-major strides of `shape` as torch computes them (a zero dimension counts as one).
fn contiguous_strides(shape: &[usize]) -> Vec<u64> {
    let mut strides = vec![0u64; shape.len()];
    let mut step = 1u64;
    for (stride, &dim) in strides.iter_mut().zip(shape).rev() {
        *stride = step;
        step = step.saturating_mul(dim.max(1) as u64);
    }
    strides
}

/// Emits the opcodes Python's pickler (protocol 2) writes for a torch state dict, memoizing
/// every value it memoizes, so the bytes equal `torch.save`'s for the same tensors.
struct Pickler {
    out: Vec<u8>,
    /// Next memo slot.
    next: u32,
    /// Memo slots of values pickled once and fetched afterwards (globals and the two constant
    /// strings torch passes by the same object every time), by a key naming them.
    memo: std::collections::HashMap<String, u32>,
}

impl Pickler {
    fn new() -> Self {
        Pickler {
            out: vec![0x80, 2], // PROTO 2
            next: 0,
            memo: std::collections::HashMap::new(),
        }
    }

    /// `BINPUT`/`LONG_BINPUT` of the value just pushed; returns its slot.
    fn put(&mut self) -> u32 {
        let slot = self.next;
        match u8::try_from(slot) {
            Ok(small) => self.out.extend_from_slice(&[b'q', small]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend_from_slice(&slot.to_le_bytes());
            }
        }
        self.next += 1;
        slot
    }

    /// `BINGET`/`LONG_BINGET`.
    fn get(&mut self, slot: u32) {
        match u8::try_from(slot) {
            Ok(small) => self.out.extend_from_slice(&[b'h', small]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend_from_slice(&slot.to_le_bytes());
            }
        }
    }

    /// Fetches the value memoized under `key`, or emits it with `emit` and memoizes it.
    fn once(&mut self, key: String, emit: impl FnOnce(&mut Self)) {
        match self.memo.get(&key) {
            Some(&slot) => self.get(slot),
            None => {
                emit(self);
                let slot = self.put();
                self.memo.insert(key, slot);
            }
        }
    }

    /// `GLOBAL module name`, memoized.
    fn global(&mut self, module: &str, name: &str) {
        self.once(format!("global {module}.{name}"), |p| {
            p.out.push(b'c');
            p.out.extend_from_slice(module.as_bytes());
            p.out.push(b'\n');
            p.out.extend_from_slice(name.as_bytes());
            p.out.push(b'\n');
        });
    }

    /// `BINUNICODE`, memoized under a fresh slot (a new string object).
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }

    /// A string torch passes as the same object every time (`'storage'`, `'cpu'`).
    fn shared_str(&mut self, s: &str) {
        self.once(format!("str {s}"), |p| {
            p.out.push(b'X');
            p.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            p.out.extend_from_slice(s.as_bytes());
        });
    }

    /// A non-negative int, in the smallest encoding Python picks.
    fn int(&mut self, v: u64) {
        if v <= 0xff {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v <= 0xffff {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= 0x7fff_ffff {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement with a clear sign bit, bit_length/8 + 1 bytes.
            let n = (64 - v.leading_zeros() as usize) / 8 + 1;
            let bytes = v.to_le_bytes();
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n.min(8)]);
            self.out.extend(std::iter::repeat_n(0u8, n.saturating_sub(8)));
        }
    }

    /// A tuple of ints: `EMPTY_TUPLE` (not memoized), `TUPLE1..3`, or `MARK ... TUPLE`.
    fn int_tuple(&mut self, items: &[u64]) {
        if items.is_empty() {
            self.out.push(b')');
            return;
        }
        let long = items.len() > 3;
        if long {
            self.out.push(b'(');
        }
        for &v in items {
            self.int(v);
        }
        self.out.push(if long { b't' } else { 0x84 + items.len() as u8 });
        self.put();
    }

    /// An empty `OrderedDict()`: the rebuild functions' `backward_hooks`.
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
        self.put();
    }

    /// The tensor `t`, whose storage is `data/<key>`.
    fn tensor(&mut self, t: &OutputTensor, key: usize, torch: TorchStorage) {
        let numel = match torch {
            TorchStorage::Typed(_) => t.shape.iter().map(|&d| d as u64).product(),
            TorchStorage::Untyped => t.nbytes,
        };
        match torch {
            TorchStorage::Typed(_) => self.global("torch._utils", "_rebuild_tensor_v2"),
            TorchStorage::Untyped => self.global("torch._utils", "_rebuild_tensor_v3"),
        }
        self.out.push(b'('); // the arguments
        self.out.push(b'('); // the persistent id
        self.shared_str("storage");
        match torch {
            TorchStorage::Typed(class) => self.global("torch", class),
            TorchStorage::Untyped => self.global("torch.storage", "UntypedStorage"),
        }
        self.str(&key.to_string());
        self.shared_str("cpu");
        self.int(numel);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q'); // BINPERSID
        self.int(0); // storage offset
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        self.int_tuple(&shape);
        self.int_tuple(&contiguous_strides(&t.shape));
        self.out.push(0x89); // requires_grad = False
        self.empty_ordered_dict();
        if torch == TorchStorage::Untyped {
            self.global("torch", t.dtype.name());
        }
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// The `data.pkl` of an archive holding `tensors` (with their dtypes' torch storages),
/// storage `data/i` for the i-th.
fn state_dict_pickle(tensors: &[(&OutputTensor, TorchStorage)]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.global("collections", "OrderedDict");
    p.out.push(b')');
    p.out.push(b'R');
    p.put();
    let mut key = 0usize;
    for batch in tensors.chunks(BATCH) {
        let many = batch.len() > 1;
        if many {
            p.out.push(b'(');
        }
        for &(t, torch) in batch {
            p.str(&t.name);
            p.tensor(t, key, torch);
            key += 1;
        }
        p.out.push(if many { b'u' } else { b's' });
    }
    p.out.push(b'.');
    p.out
}

/// The `data.pkl` of a chunk of a distributed checkpoint: the tensor itself, storage `data/0`
/// (what `torch.save(tensor)` writes).
fn tensor_pickle(t: &OutputTensor, torch: TorchStorage) -> Vec<u8> {
    let mut p = Pickler::new();
    p.tensor(t, 0, torch);
    p.out.push(b'.');
    p.out
}

/// Module of the DCP metadata dataclasses.
const DCP_METADATA: &str = "torch.distributed.checkpoint.metadata";

impl Pickler {
    /// `cls.__new__(cls)` of a DCP dataclass (`NEWOBJ`), memoized; its fields follow by `BUILD`.
    fn new_object(&mut self, module: &str, class: &str) {
        self.global(module, class);
        self.out.push(b')');
        self.out.push(0x81);
        self.put();
    }

    /// `torch.Size(dims)`.
    fn size(&mut self, dims: &[u64]) {
        self.global("torch", "Size");
        self.int_tuple(dims);
        self.out.push(0x85); // TUPLE1: the arguments
        self.put();
        self.out.push(b'R');
        self.put();
    }

    /// An empty dict (memoized) and the `MARK` its `SETITEMS` closes.
    fn open_dict(&mut self) {
        self.out.push(b'}');
        self.put();
        self.out.push(b'(');
    }

    /// A `TensorStorageMetadata` of one chunk holding the whole of `t`.
    fn tensor_storage_metadata(&mut self, t: &OutputTensor) {
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        let zeros = vec![0u64; shape.len()];
        self.new_object(DCP_METADATA, "TensorStorageMetadata");
        self.open_dict();
        self.str("properties");
        self.new_object(DCP_METADATA, "TensorProperties");
        // State: (dtype, layout, requires_grad, memory format encoding, pin_memory).
        self.out.push(b'(');
        self.global("torch", t.dtype.name());
        self.global("torch.serialization", "_get_layout");
        self.str("torch.strided");
        self.out.push(0x85);
        self.put();
        self.out.push(b'R');
        self.put();
        self.out.push(0x89); // requires_grad = False
        self.global(DCP_METADATA, "_MEM_FORMAT_ENCODING");
        self.int(0); // TORCH_CONTIGUOUS_FORMAT
        self.out.push(0x85);
        self.put();
        self.out.push(b'R');
        self.put();
        self.out.push(0x89); // pin_memory = False
        self.out.push(b't');
        self.put();
        self.out.push(b'b');
        self.str("size");
        self.size(&shape);
        self.str("chunks");
        self.out.push(b']');
        self.put();
        self.new_object(DCP_METADATA, "ChunkStorageMetadata");
        self.open_dict();
        self.str("offsets");
        self.size(&zeros);
        self.str("sizes");
        self.size(&shape);
        self.out.push(b'u');
        self.out.push(b'b');
        self.out.push(b'a'); // APPEND to the chunks
        self.out.push(b'u');
        self.out.push(b'b');
    }
}

/// The `.metadata` of a distributed checkpoint whose tensor `i` is saved whole, alone, as the
/// `torch.save` archive that is all of data file `files[i]` (its name and byte length): what
/// `torch.distributed.checkpoint.save` pickles (dataclasses built by `NEWOBJ` and `BUILD`, in
/// protocol 2), with no storage metadata.
pub(crate) fn dcp_metadata_pickle(tensors: &[&OutputTensor], files: &[(String, u64)]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.new_object(DCP_METADATA, "Metadata");
    p.open_dict();
    p.str("state_dict_metadata");
    p.open_dict();
    for t in tensors {
        p.str(&t.name);
        p.tensor_storage_metadata(t);
    }
    p.out.push(b'u');
    // Where each name sits in the state dict: at the top, as torch's own save of a flat state
    // dict records it (`("a.b",)`; splitting on dots would nest `a.b` as `{"a": {"b": ...}}`).
    p.str("planner_data");
    p.open_dict();
    for t in tensors {
        p.str(&t.name);
        p.out.push(b'(');
        p.str(&t.name);
        p.out.push(b't');
        p.put();
    }
    p.out.push(b'u');
    p.str("storage_data");
    p.open_dict();
    for (t, (file, len)) in tensors.iter().zip(files) {
        p.new_object(DCP_METADATA, "MetadataIndex");
        p.open_dict();
        p.str("fqn");
        p.str(&t.name);
        p.str("offset");
        p.size(&vec![0u64; t.shape.len()]);
        p.str("index");
        p.int(0);
        p.out.push(b'u');
        p.out.push(b'b');
        p.new_object("torch.distributed.checkpoint.filesystem", "_StorageInfo");
        p.open_dict();
        p.str("relative_path");
        p.str(file);
        p.str("offset");
        p.int(0);
        p.str("length");
        p.int(*len);
        p.out.push(b'u');
        p.out.push(b'b');
    }
    p.out.push(b'u');
    p.str("storage_meta");
    p.out.push(b'N');
    p.str("version");
    p.str("1.0.0");
    p.out.push(b'u');
    p.out.push(b'b');
    p.out.push(b'.');
    p.out
}

/// One PyTorch archive laid out for writing: the entries' places, and the small entries
/// (pickle, byte order, version) ready to write.
#[derive(Debug)]
pub(crate) struct Archive {
    layout: Layout,
    /// Absolute offset of each tensor's storage data, in order.
    offsets: Vec<u64>,
    /// The entries written whole at creation: index in the layout, data offset, bytes.
    fixed: Vec<(usize, u64, Vec<u8>)>,
}

impl Archive {
    /// Lays out an archive of `tensors`, in order; `path` names the output in errors.
    pub(crate) fn plan(tensors: &[&OutputTensor], path: &std::path::Path) -> Result<Self, FormatError> {
        Self::plan_in(Layout::new(), tensors, path)
    }

    /// Lays out the archive `torch.save(t)` writes (a chunk of a distributed checkpoint): its
    /// pickle is the tensor itself, not a state dict.
    pub(crate) fn plan_chunk(t: &OutputTensor, path: &std::path::Path) -> Result<Self, FormatError> {
        Self::plan_with(Layout::new(), &[t], path, true)
    }

    /// [`Archive::plan`] in `layout`, an empty archive (tests pass one that always uses ZIP64).
    fn plan_in(layout: Layout, tensors: &[&OutputTensor], path: &std::path::Path) -> Result<Self, FormatError> {
        Self::plan_with(layout, tensors, path, false)
    }

    /// [`Archive::plan_in`]; `bare` pickles the one tensor itself rather than a state dict.
    fn plan_with(
        mut layout: Layout,
        tensors: &[&OutputTensor],
        path: &std::path::Path,
        bare: bool,
    ) -> Result<Self, FormatError> {
        let mut typed = Vec::with_capacity(tensors.len());
        for &t in tensors {
            // `Format::check_writable` refused the dtypes torch lacks; this only keeps the
            // error typed should a caller skip it.
            let torch = t.dtype.info().torch.ok_or_else(|| FormatError::TorchDtype {
                name: t.name.clone(),
                dtype: t.dtype,
            })?;
            typed.push((t, torch));
        }
        let pickle = match (bare, typed.as_slice()) {
            (true, [(t, torch)]) => tensor_pickle(t, *torch),
            _ => state_dict_pickle(&typed),
        };
        let invalid = |reason| FormatError::InvalidOutput {
            path: path.to_path_buf(),
            reason,
        };
        let mut fixed = Vec::with_capacity(3);
        let mut add_fixed = |layout: &mut Layout, name: &str, bytes: Vec<u8>| -> Result<(), FormatError> {
            let at = layout
                .add(&format!("{ARCHIVE_PREFIX}/{name}"), bytes.len() as u64, ALIGN)
                .map_err(invalid)?;
            fixed.push((layout.len() - 1, at, bytes));
            Ok(())
        };
        add_fixed(&mut layout, "data.pkl", pickle)?;
        add_fixed(&mut layout, "byteorder", BYTEORDER.to_vec())?;
        let mut offsets = Vec::with_capacity(typed.len());
        for (key, &(t, _)) in typed.iter().enumerate() {
            offsets.push(
                layout
                    .add(&format!("{ARCHIVE_PREFIX}/data/{key}"), t.nbytes, ALIGN)
                    .map_err(invalid)?,
            );
        }
        add_fixed(&mut layout, "version", VERSION.to_vec())?;
        Ok(Archive { layout, offsets, fixed })
    }

    /// Where tensor `i`'s bytes go in the file.
    ///
    /// # Panics
    /// If `i` is not the index of a tensor given to [`Archive::plan`].
    pub(crate) fn tensor_offset(&self, i: usize) -> u64 {
        self.offsets[i]
    }

    /// Length of the file up to the central directory (the last entry's end).
    pub(crate) fn data_end(&self) -> u64 {
        self.layout.data_end()
    }

    /// Length of the file once finished (its central directory included).
    pub(crate) fn finished_len(&self) -> u64 {
        self.layout.finished_len()
    }

    /// Writes the local headers and the small entries; the storages are written afterwards.
    pub(crate) fn write_prefix(&self, file: &File) -> io::Result<()> {
        self.layout.write_local_headers(file)?;
        for (_, at, bytes) in &self.fixed {
            file.write_all_at(bytes, *at)?;
        }
        Ok(())
    }

    /// Completes the archive once every storage is in place, given the CRC-32 of each tensor's
    /// bytes in order.
    pub(crate) fn finish(&self, file: &File, data_crcs: &[u32]) -> io::Result<()> {
        if data_crcs.len() != self.offsets.len() {
            return Err(io::Error::other("one CRC per tensor is needed"));
        }
        // Entries: the pickle, the byte order, the storages, the version.
        let mut crcs = Vec::with_capacity(self.layout.len());
        let mut data = data_crcs.iter();
        let mut fixed = self.fixed.iter().peekable();
        for i in 0..self.layout.len() {
            match fixed.peek() {
                Some((index, _, bytes)) if *index == i => {
                    crcs.push(zip::crc32(bytes));
                    fixed.next();
                }
                _ => crcs.push(data.next().copied().unwrap_or(0)),
            }
        }
        self.layout.finish(file, &crcs).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::formats::output::{OutputLayout, Writer};
    use crate::formats::pickle::{self, Object};
    use crate::formats::test_util::t;
    use crate::formats::SourceFile;
    use crate::formats::{Format, TORCH_INDEX_NAME as INDEX_NAME};

    fn pickle_of(tensors: &[OutputTensor]) -> Vec<u8> {
        let typed: Vec<_> = tensors.iter().map(|t| (t, t.dtype.info().torch.unwrap())).collect();
        state_dict_pickle(&typed)
    }

    #[test]
    fn pickle_matches_torch_save_byte_for_byte() {
        // `torch.save(OrderedDict(w=torch.zeros(2, 3), n=torch.tensor(7)), f)`'s data.pkl.
        let expected: &[u8] = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\tK\x03K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rX\x01\x00\x00\x00nq\x0eh\x03((h\x04ctorch\nLongStorage\nq\x0fX\x01\x00\x00\x001q\x10h\x07K\x01tq\x11QK\x00))\x89h\x00)Rq\x12tq\x13Rq\x14u.";
        let got = pickle_of(&[t("w", DType::F32, &[2, 3]), t("n", DType::I64, &[])]);
        assert_eq!(got, expected);
    }

    #[test]
    fn pickle_reads_back_through_our_unpickler() {
        let tensors = vec![
            t("a.weight", DType::BF16, &[2, 3, 4, 5]),
            t("é", DType::U16, &[3]),
            t("empty", DType::F8E4M3, &[0, 4]),
            t("c", DType::C64, &[2]),
        ];
        let Object::Dict(pairs) = pickle::unpickle(&pickle_of(&tensors)).unwrap() else {
            panic!("not a dict");
        };
        assert_eq!(pairs.len(), 4);
        for (key, (k, v)) in pairs.iter().enumerate() {
            let Object::Tensor(r) = v else { panic!("{v:?}") };
            assert_eq!(k, &Object::Str(tensors[key].name.as_str().into()));
            assert_eq!(r.storage.key, key.to_string());
            assert_eq!(r.storage.dtype, tensors[key].dtype);
            assert_eq!(r.shape, tensors[key].shape);
            assert_eq!(r.offset, 0);
            let numel: usize = tensors[key].shape.iter().product();
            assert_eq!(r.storage.numel, numel as u64);
        }
        let Object::Dict(pairs) = pickle::unpickle(&pickle_of(&[])).unwrap() else {
            panic!("not a dict");
        };
        assert!(pairs.is_empty());
    }

    #[test]
    fn big_dicts_batch_and_use_long_memo_slots() {
        let tensors: Vec<OutputTensor> = (0..2001).map(|i| t(&format!("t{i}"), DType::U8, &[1])).collect();
        let bytes = pickle_of(&tensors);
        let Object::Dict(pairs) = pickle::unpickle(&bytes).unwrap() else {
            panic!("not a dict");
        };
        assert_eq!(pairs.len(), 2001);
        assert_eq!(pairs[2000].0, Object::Str("t2000".into()));
        // Two full batches (SETITEMS) and a single SETITEM before STOP.
        assert!(bytes.ends_with(b"s."));
        // Python's own pickle reader, where there is one, agrees about the structure.
        let script = "import sys, pickletools; pickletools.dis(sys.stdin.buffer.read(), out=open('/dev/null', 'w'))";
        if let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            assert!(child.wait().unwrap().success());
        }
    }

    #[test]
    fn large_ints_use_python_encodings() {
        let mut p = Pickler::new();
        for v in [255u64, 256, 65535, 65536, 0x7fff_ffff, 0x8000_0000, 1 << 40, u64::MAX] {
            p.int(v);
        }
        let expected: &[u8] = b"\x80\x02K\xffM\x00\x01M\xff\xffJ\x00\x00\x01\x00J\xff\xff\xff\x7f\x8a\x05\x00\x00\x00\x80\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00";
        assert_eq!(p.out, expected);
        assert_eq!(contiguous_strides(&[2, 0, 3]), vec![3, 3, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<u64>::new());
    }

    #[test]
    fn archive_entries_are_aligned_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let tensors = vec![
            t("x", DType::F32, &[3]),
            t("y", DType::U8, &[]),
            t("z", DType::I16, &[0]),
        ];
        let w = Writer::create(
            Format::PyTorch,
            OutputLayout::File(path.clone()),
            &tensors,
            &Default::default(),
        )
        .unwrap();
        let data: [&[u8]; 3] = [&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0], &[9], &[]];
        for (i, d) in data.iter().enumerate() {
            let (file, at) = w.placement(i);
            assert_eq!(at % 64, 0);
            file.write_all_at(d, at).unwrap();
        }
        let crcs: Vec<u32> = data.iter().map(|d| zip::crc32(d)).collect();
        assert_eq!(w.commit(&[], &crcs).unwrap(), vec![path.clone()]);
        let source = SourceFile::open(&path).unwrap();
        let entries = zip::read_entries(&source).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "archive/data.pkl",
                "archive/byteorder",
                "archive/data/0",
                "archive/data/1",
                "archive/data/2",
                "archive/version"
            ]
        );
        assert!(entries.iter().all(|e| e.data_offset % 64 == 0 && e.method == 0));
        let read = super::super::torch::read_tensors(&source, 0).unwrap();
        let got: Vec<(&str, DType, Vec<usize>, u64)> = read
            .iter()
            .map(|e| (e.name.as_str(), e.dtype, e.shape.clone(), e.nbytes))
            .collect();
        assert_eq!(
            got,
            [
                ("x", DType::F32, vec![3], 12),
                ("y", DType::U8, vec![], 1),
                ("z", DType::I16, vec![0], 0)
            ]
        );
        let mut back = vec![0u8; 12];
        source.read_at(read[0].offset, &mut back).unwrap();
        assert_eq!(back, data[0]);
        // Only the output is left: no temporary.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Runs `script` with `python3 -c` and the given arguments when torch can be imported;
    /// `false` when it cannot (the check is skipped), a panic when the script fails.
    fn with_torch(script: &str, args: &[&std::path::Path]) -> bool {
        let prelude = "import sys\ntry:\n    import torch\nexcept ImportError:\n    sys.exit(77)\n";
        let Ok(out) = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .args(args)
            .output()
        else {
            return false;
        };
        if out.status.code() == Some(77) {
            return false;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        true
    }

    #[test]
    fn zip64_archives_load_in_torch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let tensors = [t("a", DType::I16, &[3]), t("b", DType::U8, &[0])];
        let refs: Vec<&OutputTensor> = tensors.iter().collect();
        let archive = Archive::plan_in(Layout::zip64_everywhere(), &refs, &path).unwrap();
        let file = File::create(&path).unwrap();
        archive.write_prefix(&file).unwrap();
        let data = [1u8, 0, 2, 0, 0xff, 0x7f];
        file.write_all_at(&data, archive.tensor_offset(0)).unwrap();
        archive.finish(&file, &[zip::crc32(&data), zip::crc32(&[])]).unwrap();
        let source = SourceFile::open(&path).unwrap();
        let read = super::super::torch::read_tensors(&source, 0).unwrap();
        assert_eq!(read.iter().map(|e| e.nbytes).collect::<Vec<_>>(), [6, 0]);
        let script = "import zipfile\nassert zipfile.ZipFile(sys.argv[1]).testzip() is None\n\
                      for mmap in (False, True):\n    \
                      sd = torch.load(sys.argv[1], weights_only=True, mmap=mmap)\n    \
                      assert sd['a'].tolist() == [1, 2, 32767], sd\n    \
                      assert sd['b'].dtype == torch.uint8 and sd['b'].shape == (0,)\n";
        with_torch(script, &[&path]);
    }

    #[test]
    fn sharded_directories_follow_the_hugging_face_layout() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        for stale in [
            "pytorch_model-00001-of-00009.bin",
            "pytorch_model.bin",
            "training_args.bin",
        ] {
            std::fs::write(dir.join(stale), b"old").unwrap();
        }
        let tensors: Vec<OutputTensor> = (0..5).map(|i| t(&format!("layer.{i}"), DType::F32, &[4])).collect();
        let layout = OutputLayout::Directory {
            dir: dir.clone(),
            shard_budget: Some(32),
        };
        let w = Writer::create(Format::PyTorch, layout, &tensors, &Default::default()).unwrap();
        let mut crcs = Vec::new();
        for i in 0..tensors.len() {
            let bytes = [i as u8; 16];
            let (file, at) = w.placement(i);
            file.write_all_at(&bytes, at).unwrap();
            crcs.push(zip::crc32(&bytes));
        }
        let written = w.commit(&[], &crcs).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "pytorch_model-00001-of-00003.bin",
                "pytorch_model-00002-of-00003.bin",
                "pytorch_model-00003-of-00003.bin",
                INDEX_NAME
            ]
        );
        let mut listing: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        listing.sort();
        assert_eq!(listing.len(), 5, "{listing:?}"); // stale outputs gone, training_args.bin kept
        assert!(listing.contains(&"training_args.bin".to_string()));
        let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(INDEX_NAME)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 80);
        assert_eq!(index["weight_map"]["layer.4"], "pytorch_model-00003-of-00003.bin");
        // Each shard is an archive of its own tensors, storages numbered from 0.
        let source = SourceFile::open(&dir.join("pytorch_model-00002-of-00003.bin")).unwrap();
        let read = super::super::torch::read_tensors(&source, 0).unwrap();
        assert_eq!(
            read.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["layer.2", "layer.3"]
        );
        let mut back = [0u8; 16];
        source.read_at(read[1].offset, &mut back).unwrap();
        assert_eq!(back, [3u8; 16]);

        // Safetensors weights in the directory would shadow PyTorch output: refused.
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        let layout = OutputLayout::Directory {
            dir: dir.clone(),
            shard_budget: None,
        };
        let err = Writer::create(Format::PyTorch, layout, &tensors, &Default::default()).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }

    #[test]
    fn dtypes_torch_lacks_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![t("ok", DType::F32, &[1]), t("q.packed", DType::F4, &[2])];
        let err = Writer::create(
            Format::PyTorch,
            OutputLayout::File(dir.path().join("m.bin")),
            &tensors,
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(&err, FormatError::TorchDtype { name, dtype: DType::F4 } if name == "q.packed"));
        let text = err.to_string();
        assert!(text.contains("\"q.packed\"") && text.contains("cast"), "{text}");
        let check = |dtype| Format::PyTorch.check_writable([("w", dtype)].into_iter(), false);
        assert!(check(DType::F6E3M2).is_err());
        for dtype in DType::ALL {
            if !matches!(dtype, DType::F4 | DType::F6E2M3 | DType::F6E3M2) {
                check(dtype).unwrap();
            }
        }
        // Nothing was created.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn dropping_an_uncommitted_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::create(
            Format::PyTorch,
            OutputLayout::File(dir.path().join("m.pth")),
            &[t("x", DType::U8, &[4])],
            &Default::default(),
        )
        .unwrap();
        // The temporary is unnamed until commit (O_TMPFILE).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A wrong number of CRCs is an error, and leaves nothing either.
        let w = Writer::create(
            Format::PyTorch,
            OutputLayout::File(dir.path().join("m.pth")),
            &[t("x", DType::U8, &[4])],
            &Default::default(),
        )
        .unwrap();
        assert!(w.commit(&[], &[]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
