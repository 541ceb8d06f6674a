//! A restricted unpickler for `data.pkl` of a PyTorch checkpoint: it builds values, never runs
//! code. It accepts what `torch.load(weights_only=True)` needs for a state dict: the opcodes of
//! protocols 2 to 4 that build plain data, persistent ids for storages, and only these globals:
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! the typed storages (`torch.FloatStorage`, ...) and dtypes (`torch.float16`, ...). Any other
//! global (`posix.system`, `builtins.eval`, ...) is refused as soon as it is named.
use std::collections::HashMap;
use std::fmt::{self, Write as _};

use safetensors::Dtype;

/// Why a pickle was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// It names a global outside the allow-list (`module.name`).
    #[error("refused global {0}")]
    Refused(String),
    /// It is malformed, or uses an opcode or construct a state dict does not need.
    #[error("{0}")]
    Malformed(String),
}

type Result<T> = std::result::Result<T, PickleError>;

/// Most values on the stack at once: a state dict needs a few thousand (`pickle` batches 1000
/// items per SETITEMS); the bound also bounds nesting, so dropping values cannot overflow.
const MAX_STACK: usize = 4096;
/// Most values copied into or out of the memo in all: a hostile pickle fetching and nesting
/// memoized containers again and again ("billion laughs"), or memoizing one large container
/// again and again, would otherwise grow without bound.
const MAX_MEMO_COPIES: usize = 4 << 20;
/// Deepest nesting of containers: a state dict needs 4 (dict, tensor arguments, size tuple).
/// `TUPLE1` repeated nests one level a byte; unbounded, dropping (or copying, or printing) the
/// value would recurse deep enough to overflow the thread's stack.
const MAX_DEPTH: usize = 64;
/// Most characters of a value quoted in an error message.
const MAX_QUOTED: usize = 160;

fn bad<T>(message: impl Into<String>) -> Result<T> {
    Err(PickleError::Malformed(message.into()))
}

/// A `fmt::Write` that stops (with an error) after `left` more bytes.
struct Capped {
    out: String,
    left: usize,
}

impl fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() > self.left {
            let mut end = self.left;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.out.push_str(&s[..end]);
            self.left = 0;
            return Err(fmt::Error);
        }
        self.out.push_str(s);
        self.left -= s.len();
        Ok(())
    }
}

/// `v` as `{v:?}`, cut after [`MAX_QUOTED`] characters so that an error quoting a large value
/// stays short (formatting stops there, so it costs no more than that either).
fn brief(v: &impl fmt::Debug) -> String {
    let mut w = Capped { out: String::new(), left: MAX_QUOTED };
    if write!(w, "{v:?}").is_err() {
        w.out.push_str("...");
    }
    w.out
}

/// A tensor as the pickle describes it: a view of a storage kept in `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRecord {
    /// The storage's entry name under `data/`.
    pub key: String,
    /// Element type of the storage.
    pub dtype: Dtype,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// The allowed globals.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(Dtype),
    DtypeObject,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage { key: String, dtype: Dtype },
    Tensor(TensorRecord),
    Mark,
}

fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

fn global(module: &str, name: &str) -> Result<Global> {
    let found = match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", n) => storage_dtype(n).map(Global::Storage).or_else(|| {
            matches!(n, "float16" | "bfloat16" | "float32" | "float64" | "half" | "float")
                .then_some(Global::DtypeObject)
        }),
        _ => None,
    };
    found.ok_or_else(|| PickleError::Refused(format!("{module}.{name}")))
}

fn index(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).or_else(|_| bad(format!("negative {what} {i}"))),
        other => bad(format!("{what} is {}, not an integer", brief(other))),
    }
}

fn indices(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) => items.iter().map(|i| index(i, what)).collect(),
        other => bad(format!("{what} is {}, not a tuple", brief(other))),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
fn rebuild_tensor(args: Vec<Value>) -> Result<Value> {
    if !(6..=7).contains(&args.len()) {
        return bad(format!("_rebuild_tensor_v2 takes 6 or 7 arguments, got {}", args.len()));
    }
    let Value::Storage { key, dtype } = &args[0] else {
        return bad(format!("_rebuild_tensor_v2 on {}, not a storage", brief(&args[0])));
    };
    let shape = indices(&args[2], "size")?;
    let stride = indices(&args[3], "stride")?;
    if shape.len() != stride.len() {
        return bad(format!("size {} and stride {} differ in rank", brief(&shape), brief(&stride)));
    }
    let offset = index(&args[1], "storage offset")?;
    Ok(Value::Tensor(TensorRecord { key: key.clone(), dtype: *dtype, offset, shape, stride }))
}

fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else { return bad(format!("REDUCE with arguments {}, not a tuple", brief(&args))) };
    match callable {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Vec::new())),
        Value::Global(Global::RebuildTensor) => rebuild_tensor(args),
        Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            other => bad(format!("_rebuild_parameter on {}, not a tensor", brief(&other))),
        },
        other => bad(format!("REDUCE calls {}, which builds no tensor or dict", brief(&other))),
    }
}

/// `('storage', storage_type, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else { return bad(format!("persistent id {} is not a tuple", brief(&pid))) };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_), Value::Int(_)]
            if kind == "storage" =>
        {
            Ok(Value::Storage { key: key.clone(), dtype: *dtype })
        }
        other => bad(format!("persistent id {} is not ('storage', type, key, location, numel)", brief(&other))),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    copies: usize,
}

/// Whether `v` nests containers more than `limit` deep (recursing no deeper than that).
fn deeper_than(v: &Value, limit: usize) -> bool {
    let inner = |limit: usize| -> Option<usize> { limit.checked_sub(1) };
    match v {
        Value::Tuple(items) | Value::List(items) => {
            inner(limit).is_none_or(|l| items.iter().any(|i| deeper_than(i, l)))
        }
        Value::Dict(items) => {
            inner(limit).is_none_or(|l| items.iter().any(|(k, v)| deeper_than(k, l) || deeper_than(v, l)))
        }
        _ => false,
    }
}

/// Refuses `items` as the contents of a container if that would nest deeper than [`MAX_DEPTH`].
fn nestable(items: &[Value], at: usize) -> Result<()> {
    if items.iter().any(|v| deeper_than(v, MAX_DEPTH - 1)) {
        return bad(format!("containers nested more than {MAX_DEPTH} deep at byte {at}: not a state dict"));
    }
    Ok(())
}

/// How many values `v` holds, itself included.
fn count(v: &Value) -> usize {
    match v {
        Value::Tuple(items) | Value::List(items) => 1 + items.iter().map(count).sum::<usize>(),
        Value::Dict(items) => 1 + items.iter().map(|(k, v)| count(k) + count(v)).sum::<usize>(),
        _ => 1,
    }
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let slice = self.pos.checked_add(n).and_then(|end| self.data.get(self.pos..end));
        let Some(slice) = slice else { return bad(format!("cut short at byte {} (needs {n} more)", self.pos)) };
        self.pos += n;
        Ok(slice)
    }
    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn len_u64(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(v).or_else(|_| bad(format!("length {v} too large")))
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).or_else(|_| bad("string is not UTF-8"))
    }
    fn line(&mut self) -> Result<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&c| c == b'\n') else { return bad("GLOBAL without a newline") };
        let s = self.string(n)?;
        self.pos += 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Value::Mark) | None => bad(format!("stack underflow at byte {}", self.pos)),
            Some(v) => Ok(v),
        }
    }
    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Value::Mark) | None => bad(format!("empty stack at byte {}", self.pos)),
            Some(v) => Ok(v),
        }
    }
    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.stack.iter().rposition(|v| matches!(v, Value::Mark)) else {
            return bad(format!("no MARK before byte {}", self.pos));
        };
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }
    fn memo_get(&mut self, at: u32) -> Result<()> {
        let v = self.memo.get(&at).cloned();
        let Some(v) = v else { return bad(format!("memo {at} read before it was written")) };
        self.copies += count(&v);
        if self.copies > MAX_MEMO_COPIES {
            return bad(format!("more than {MAX_MEMO_COPIES} values copied from the memo: not a state dict"));
        }
        self.push(v)
    }
    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return bad(format!("more than {MAX_STACK} values on the stack at byte {}: not a state dict", self.pos));
        }
        self.stack.push(v);
        Ok(())
    }
    fn memo_put(&mut self, at: u32) -> Result<()> {
        self.copies += count(self.top()?);
        if self.copies > MAX_MEMO_COPIES {
            return bad(format!("more than {MAX_MEMO_COPIES} values copied into the memo: not a state dict"));
        }
        let v = self.top()?.clone();
        self.memo.insert(at, v);
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return bad("SETITEMS with an odd number of values");
        }
        nestable(&items, self.pos)?;
        let Value::Dict(dict) = self.top()? else { return bad("SETITEM(S) on something not a dict") };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        Ok(())
    }
    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        nestable(&items, self.pos)?;
        let Value::List(list) = self.top()? else { return bad("APPEND(S) on something not a list") };
        list.extend(items);
        Ok(())
    }

    /// Runs one opcode; `Some` with the result at STOP.
    fn step(&mut self) -> Result<Option<Value>> {
        let at = self.pos;
        let op = self.byte()?;
        let push = match op {
            0x80 => {
                let proto = self.byte()?;
                if !(2..=4).contains(&proto) {
                    return bad(format!("pickle protocol {proto} (2 to 4 are read)"));
                }
                None
            }
            0x95 => {
                self.take(8)?;
                None
            }
            b'}' => Some(Value::Dict(Vec::new())),
            b']' => Some(Value::List(Vec::new())),
            b')' => Some(Value::Tuple(Vec::new())),
            b'(' => Some(Value::Mark),
            b'N' => Some(Value::None),
            0x88 | 0x89 => Some(Value::Bool),
            b'X' => {
                let n = self.u32()? as usize;
                Some(Value::Str(self.string(n)?))
            }
            0x8c => {
                let n = self.byte()? as usize;
                Some(Value::Str(self.string(n)?))
            }
            0x8d => {
                let n = self.len_u64()?;
                Some(Value::Str(self.string(n)?))
            }
            b'C' => {
                let n = self.byte()? as usize;
                self.take(n)?;
                Some(Value::Bytes)
            }
            b'B' => {
                let n = self.u32()? as usize;
                self.take(n)?;
                Some(Value::Bytes)
            }
            b'J' => Some(Value::Int(i64::from(self.u32()? as i32))),
            b'K' => Some(Value::Int(i64::from(self.byte()?))),
            b'M' => {
                let b = self.take(2)?;
                Some(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))))
            }
            0x8a => {
                let n = self.byte()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return bad(format!("LONG1 of {n} bytes"));
                }
                let fill = if b.last().is_some_and(|&l| l & 0x80 != 0) { 0xFF } else { 0 };
                let mut full = [fill; 8];
                full[..n].copy_from_slice(b);
                Some(Value::Int(i64::from_le_bytes(full)))
            }
            b'G' => {
                self.take(8)?;
                Some(Value::Float)
            }
            b't' => {
                let items = self.pop_mark()?;
                nestable(&items, at)?;
                Some(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                nestable(&items, at)?;
                Some(Value::Tuple(items.into_iter().rev().collect()))
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
                None
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
                None
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
                None
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
                None
            }
            b'q' => {
                let i = self.byte()?;
                self.memo_put(u32::from(i))?;
                None
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
                None
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).or_else(|_| bad("memo too large"))?;
                self.memo_put(i)?;
                None
            }
            b'h' => {
                let i = self.byte()?;
                self.memo_get(u32::from(i))?;
                None
            }
            b'j' => {
                let i = self.u32()?;
                self.memo_get(i)?;
                None
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                Some(Value::Global(global(&module, &name)?))
            }
            0x93 => {
                let (name, module) = (self.pop()?, self.pop()?);
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return bad("STACK_GLOBAL on values that are not strings");
                };
                Some(Value::Global(global(&module, &name)?))
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                Some(reduce(callable, args)?)
            }
            b'b' => {
                let _state = self.pop()?;
                if !matches!(self.top()?, Value::Dict(_) | Value::Tensor(_)) {
                    return bad("BUILD on something not a dict or tensor");
                }
                None
            }
            b'Q' => {
                let pid = self.pop()?;
                Some(persistent_load(pid)?)
            }
            b'0' => {
                self.pop()?;
                None
            }
            b'.' => return self.pop().map(Some),
            other => return bad(format!("opcode 0x{other:02x} at byte {at} is not accepted")),
        };
        if let Some(v) = push {
            self.push(v)?;
        }
        Ok(None)
    }
}

/// The tensors of the state dict pickled in `data`, by name, in pickle order. Entries whose
/// value is not a tensor are skipped; a result that is not a dict with string keys is an error.
pub fn state_dict(data: &[u8]) -> Result<Vec<(String, TensorRecord)>> {
    let mut m = Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), copies: 0 };
    let result = loop {
        if let Some(v) = m.step()? {
            break v;
        }
    };
    let Value::Dict(items) = result else { return bad("the pickle holds no dict of tensors") };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else { return bad(format!("state dict key {} is not a string", brief(&k))) };
        if let Value::Tensor(t) = v {
            out.push((name, t));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn malformed(data: &[u8]) -> String {
        match state_dict(data) {
            Err(PickleError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_protocol_4_frames_memoize_and_long_ints() {
        // {'w': _rebuild_tensor_v2(storage, 2**40 offset is too far for a test, so LONG1 in numel)}
        let mut p = vec![0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'}', 0x94, b'(', 0x8c, 1, b'w'];
        p.extend([0x8c, 12]);
        p.extend(b"torch._utils");
        p.extend([0x8c, 18]);
        p.extend(b"_rebuild_tensor_v2");
        p.extend([0x93, 0x94, b'(', b'(', 0x8c, 7]);
        p.extend(b"storage");
        p.extend(b"ctorch\nHalfStorage\n");
        p.extend([0x8c, 1, b'k', 0x8c, 6]);
        p.extend(b"cuda:0");
        p.extend([0x8a, 5, 0, 0, 0, 0, 1, b't', b'Q', b'K', 3, b'K', 2, 0x85, b'K', 1, 0x85, 0x89, b'}', b't', b'R']);
        p.extend([b'u', b'.']);
        let tensors = state_dict(&p).unwrap();
        let want = TensorRecord { key: "k".into(), dtype: Dtype::F16, offset: 3, shape: vec![2], stride: vec![1] };
        assert_eq!(tensors, vec![("w".to_string(), want)]);
    }

    #[test]
    fn negative_long1_is_sign_extended() {
        let mut m = Machine { data: &[0x8a, 1, 0xFF], pos: 0, stack: Vec::new(), memo: HashMap::new(), copies: 0 };
        m.step().unwrap();
        assert!(matches!(m.stack.as_slice(), [Value::Int(-1)]));
    }

    #[test]
    fn refuses_opcodes_that_build_arbitrary_objects() {
        // INST 'os' 'system' would call it on the marked values; OBJ and NEWOBJ likewise.
        assert!(malformed(b"\x80\x02(X\x02\x00\x00\x00lsios\nsystem\n.").contains("opcode 0x69"));
        assert!(malformed(b"\x80\x02}\x81.").contains("opcode 0x81"));
        assert!(malformed(b"\x80\x05}.").contains("protocol 5"));
    }

    #[test]
    fn refuses_calling_an_allowed_class_with_arguments_it_does_not_need() {
        assert!(malformed(b"\x80\x02ctorch\nFloatStorage\n)R.").contains("REDUCE calls"));
        assert!(malformed(b"\x80\x02ccollections\nOrderedDict\n]\x85R.").contains("REDUCE calls"));
    }

    #[test]
    fn bounds_the_stack_and_memo_copies() {
        let deep: Vec<u8> = [0x80, 2].into_iter().chain(std::iter::repeat_n(b']', MAX_STACK + 1)).collect();
        assert!(malformed(&deep).contains("on the stack"));
        // L(n+1) = [L(n), L(n)]: doubling copies out of the memo.
        let mut laughs = vec![0x80, 2, b']', b'q', 0];
        for i in 0..40u8 {
            laughs.extend([b']', b'(', b'h', i, b'h', i, b'e', b'q', i + 1]);
        }
        assert!(malformed(&laughs).contains("copied from the memo"));
    }

    #[test]
    fn memoizing_one_large_list_again_and_again_is_bounded() {
        // A list of 4000 Nones, then MEMOIZE 100_000 times: 400 million values cloned unchecked.
        let mut p = vec![0x80, 2, b']', b'('];
        p.extend(std::iter::repeat_n(b'N', 4000));
        p.push(b'e');
        p.extend(std::iter::repeat_n(0x94, 100_000));
        p.push(b'.');
        assert!(malformed(&p).contains("copied into the memo"));
    }

    #[test]
    fn deep_nesting_is_refused_before_it_can_overflow_the_stack() {
        // `]` wrapped in a million TUPLE1s: dropping it used to recurse a million frames deep.
        let mut p = vec![0x80, 2, b']'];
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        p.push(b'.');
        assert!(malformed(&p).contains("nested more than"));
        // Lists nested through APPEND and the stack, and dicts through SETITEM.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', MAX_STACK - 1));
        p.extend(std::iter::repeat_n(b'a', MAX_STACK - 2));
        assert!(malformed(&p).contains("nested more than"));
        let mut p = vec![0x80, 2, b'}'];
        for _ in 0..200 {
            p.extend([b'K', 1, b'}']);
        }
        p.extend(std::iter::repeat_n(b's', 200));
        assert!(malformed(&p).contains("nested more than"));
    }

    #[test]
    fn errors_quote_large_values_briefly() {
        // A persistent id that is a list of 3000 strings: the error quotes the start of it.
        let mut p = vec![0x80, 2, b']', b'('];
        for _ in 0..3000 {
            p.extend([0x8c, 5]);
            p.extend(b"hello");
        }
        p.extend([b'e', b'Q', b'.']);
        let m = malformed(&p);
        assert!(m.len() < 2 * MAX_QUOTED, "{} bytes: {m}", m.len());
        assert!(m.starts_with("persistent id List([Str(\"hello\")") && m.contains("..."), "{m}");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::synth::torch_bin::{PickledTensor, state_dict_pickle};

        /// The pickle of a small valid state dict (two tensors, one storage each).
        fn valid() -> Vec<u8> {
            let records = [
                PickledTensor {
                    name: "a.weight",
                    key: "0",
                    dtype: Dtype::F16,
                    numel: 6,
                    offset: 0,
                    shape: &[2, 3],
                    stride: &[3, 1],
                },
                PickledTensor {
                    name: "b.bias",
                    key: "1",
                    dtype: Dtype::F32,
                    numel: 4,
                    offset: 1,
                    shape: &[3],
                    stride: &[1],
                },
            ];
            state_dict_pickle(&records)
        }

        /// Never a panic: a value or an error; an accepted pickle holds sane records.
        fn total(data: &[u8]) -> std::result::Result<(), TestCaseError> {
            if let Ok(tensors) = state_dict(data) {
                for (_, t) in tensors {
                    prop_assert_eq!(t.shape.len(), t.stride.len());
                }
            }
            Ok(())
        }

        /// One opcode with well-formed arguments, so that sequences of them get past the first
        /// few bytes and reach the machine's deeper states.
        fn opcode() -> impl Strategy<Value = Vec<u8>> {
            let fixed = prop::sample::select(vec![
                b'}', b']', b')', b'(', b'N', 0x88, b't', 0x85, 0x86, 0x87, b's', b'u', b'a', b'e', 0x94, b'R', b'b',
                b'Q', b'0', 0x93, b'.',
            ])
            .prop_map(|b| vec![b]);
            let globals = prop::sample::select(vec![
                &b"ccollections\nOrderedDict\n"[..],
                b"ctorch._utils\n_rebuild_tensor_v2\n",
                b"ctorch._utils\n_rebuild_parameter\n",
                b"ctorch\nHalfStorage\n",
                b"ctorch\nfloat16\n",
                b"cposix\nsystem\n",
            ])
            .prop_map(<[u8]>::to_vec);
            let strings = prop::sample::select(vec!["storage", "0", "cpu", "w", "collections", "OrderedDict", "torch"])
                .prop_map(|t| [&[0x8c, t.len() as u8][..], t.as_bytes()].concat());
            prop_oneof![
                4 => fixed,
                1 => globals,
                2 => strings,
                2 => any::<u8>().prop_map(|k| vec![b'K', k]),
                1 => any::<u8>().prop_map(|i| vec![b'q', i % 8]),
                1 => any::<u8>().prop_map(|i| vec![b'h', i % 8]),
                1 => any::<[u8; 4]>().prop_map(|b| [&[b'J'][..], &b].concat()),
                1 => (0u8..10, any::<[u8; 9]>()).prop_map(|(n, b)| [&[0x8a, n][..], &b[..usize::from(n).min(9)]].concat()),
                1 => any::<u8>().prop_map(|b| vec![b]),
            ]
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(1000))]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
                total(&data)?;
            }

            #[test]
            fn opcode_sequences_never_panic(ops in prop::collection::vec(opcode(), 0..64)) {
                let data: Vec<u8> = [vec![0x80, 2]].into_iter().chain(ops).flatten().collect();
                total(&data)?;
            }

            #[test]
            fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
                let mut data = valid();
                for (at, byte) in flips {
                    let i = at.index(data.len());
                    data[i] = byte;
                }
                total(&data)?;
            }

            #[test]
            fn huge_length_fields_are_errors(at in any::<prop::sample::Index>(), op in prop::sample::select(vec![b'X', b'B', 0x8d, 0x95]), fill in prop::sample::select(vec![0xFFu8, 0x7F, 0x80])) {
                // A length field of all-ones (or nearly) spliced in at any opcode boundary.
                let data = valid();
                let i = at.index(data.len());
                let width = if matches!(op, 0x8d | 0x95) { 8 } else { 4 };
                let mut p = data[..i].to_vec();
                p.push(op);
                p.extend(std::iter::repeat_n(fill, width));
                p.extend(&data[i..]);
                total(&p)?;
            }
        }

        #[test]
        fn the_valid_pickle_reads_and_every_truncation_is_an_error() {
            let data = valid();
            let tensors = state_dict(&data).unwrap();
            assert_eq!(tensors.len(), 2);
            for end in 0..data.len() {
                assert!(state_dict(&data[..end]).is_err(), "cut at {end} of {} accepted", data.len());
            }
        }
    }
}
