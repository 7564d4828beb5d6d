//! [`GpuContext`]: one wgpu adapter, device and queue; storage buffers checked
//! against the device's limits; compute dispatches recorded into one command
//! encoder and submitted together; asynchronous readback.
//!
//! Everything that waits for the GPU is `async` (`map_async` completes a small
//! oneshot future), because in a browser a blocking poll is impossible. On
//! native targets `*_blocking` wrappers drive the futures with `pollster`.
//!
//! Dispatch parameters travel in one uniform buffer with dynamic offsets
//! (256 bytes a dispatch), written once per submission, so recording a
//! dispatch allocates no GPU memory.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use bytemuck::{Pod, Zeroable};

use crate::error::{GpuError, GpuResult};

/// WGSL shared by every shader file: the parameter block and its binding.
const COMMON_WGSL: &str = include_str!("shaders/common.wgsl");
/// The mHC wrapper shaders (coefficients, Sinkhorn–Knopp, pre-aggregate, post/res merge, backward).
pub const WRAPPER_WGSL: &str = include_str!("shaders/wrapper.wgsl");
/// The reference model's shaders (matmul, RMSNorm, attention, GELU, cross-entropy, AdamW, …).
pub const MODEL_WGSL: &str = include_str!("shaders/model.wgsl");

/// Bytes between two dispatches' parameter blocks (the largest uniform offset alignment WebGPU allows).
const PARAM_STRIDE: u64 = 256;
/// Parameter blocks per submission before the encoder is flushed.
const PARAM_SLOTS: u64 = 2048;

/// Which shader file a kernel lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Wrapper,
    Model,
}

/// One compute entry point: its file, name and the access of its storage
/// bindings in order (`r` read-only, `w` read-write), which must match the WGSL.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub module: Module,
    pub entry: &'static str,
    pub access: &'static str,
}

/// The parameter block of every dispatch (`Params` in `common.wgsl`): 16
/// integers and 8 floats whose meaning each entry point documents.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct Params {
    pub u: [u32; 16],
    pub f: [f32; 8],
}

impl Params {
    /// A block with the given integers (the rest zero) and floats.
    pub fn new(u: &[u32], f: &[f32]) -> Self {
        let mut p = Self::default();
        p.u[..u.len()].copy_from_slice(u);
        p.f[..f.len()].copy_from_slice(f);
        p
    }
}

/// A storage buffer of `len` 32-bit elements (f32 or u32) on the device.
#[derive(Debug)]
pub struct GpuBuffer {
    buffer: wgpu::Buffer,
    len: usize,
}

impl GpuBuffer {
    /// Elements it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element (its allocation still has one, as wgpu needs).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wgpu buffer.
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

#[derive(Default)]
struct DeviceStatus {
    lost: Option<String>,
    error: Option<String>,
}

struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    params: Vec<u8>,
    modules: HashMap<Module, wgpu::ShaderModule>,
    layouts: HashMap<&'static str, wgpu::BindGroupLayout>,
    pipelines: HashMap<(Module, &'static str), (wgpu::ComputePipeline, &'static str)>,
}

/// One GPU (or software adapter) through wgpu: device, queue, its limits and
/// the compiled pipelines. Create it once and share it (`Arc`).
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    status: Arc<Mutex<DeviceStatus>>,
    param_layout: wgpu::BindGroupLayout,
    param_buffer: wgpu::Buffer,
    param_group: wgpu::BindGroup,
    recorder: Mutex<Recorder>,
    serial: bool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.adapter_name())
            .finish()
    }
}

impl GpuContext {
    /// Opens the default adapter (high-performance preference; `WGPU_BACKEND`
    /// and the other wgpu environment variables apply) or, when the variable
    /// `MHC_WGPU_ADAPTER` is set (native only), the first adapter whose name
    /// contains it. [`GpuError::NoAdapter`] when there is none.
    pub async fn new() -> GpuResult<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        #[cfg(not(target_arch = "wasm32"))]
        if let Ok(want) = std::env::var("MHC_WGPU_ADAPTER") {
            let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            let found = adapters
                .into_iter()
                .find(|a| a.get_info().name.contains(&want));
            return match found {
                Some(a) => Self::from_adapter(a).await,
                None => Err(GpuError::NoAdapter(format!(
                    "MHC_WGPU_ADAPTER={want} matches none of {names:?}"
                ))),
            };
        }
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        Self::from_adapter(adapter).await
    }

    /// [`Self::new`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> GpuResult<Self> {
        pollster::block_on(Self::new())
    }

    /// A context on a given adapter, with the adapter's full limits.
    pub async fn from_adapter(adapter: wgpu::Adapter) -> GpuResult<Self> {
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("mhc-gpu"),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::DeviceRequest(e.to_string()))?;
        let status = Arc::new(Mutex::new(DeviceStatus::default()));
        {
            let s = status.clone();
            device.set_device_lost_callback(move |reason, message| {
                if let Ok(mut st) = s.lock() {
                    st.lost = Some(format!("{reason:?}: {message}"));
                }
            });
            let s = status.clone();
            device.on_uncaptured_error(Arc::new(move |e| {
                if let Ok(mut st) = s.lock() {
                    st.error.get_or_insert_with(|| e.to_string());
                }
            }));
        }
        let limits = device.limits();
        let param_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("mhc params"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: wgpu::BufferSize::new(size_of::<Params>() as u64),
                },
                count: None,
            }],
        });
        let param_buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mhc params"),
            size: PARAM_STRIDE * PARAM_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let param_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("mhc params"),
            layout: &param_layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &param_buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(size_of::<Params>() as u64),
                }),
            }],
        });
        Ok(Self {
            device,
            queue,
            limits,
            status,
            param_layout,
            param_buffer,
            param_group,
            recorder: Mutex::new(Recorder {
                encoder: None,
                params: Vec::new(),
                modules: HashMap::new(),
                layouts: HashMap::new(),
                pipelines: HashMap::new(),
            }),
            serial: info.backend == wgpu::Backend::BrowserWebGpu
                && info.device_type == wgpu::DeviceType::Cpu,
            info,
        })
    }

    /// Whether the row-wise kernels (matmul, RMSNorm, the wrapper's
    /// per-token projections and backward reductions) run **serially**: one
    /// invocation per output element, row or token, without workgroup
    /// memory or barriers, instead of cooperatively (tiles and tree
    /// reductions in workgroup memory). Serial is the default on a browser's
    /// software (fallback) adapter such as Chromium's SwiftShader, where a
    /// workgroup barrier costs far more than the loads it saves (measured: a
    /// step of the demo's model 3–4× faster); cooperative everywhere else.
    /// Both compute the same sums (parity-tested against the core).
    pub fn serial_kernels(&self) -> bool {
        self.serial
    }

    /// Chooses serial (`true`) or cooperative kernels (see [`Self::serial_kernels`]),
    /// before the context is shared.
    pub fn set_serial_kernels(&mut self, serial: bool) {
        self.serial = serial;
    }

    /// The adapter in one line, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) | Vulkan | Cpu | Mesa 22.3.6`.
    pub fn adapter_name(&self) -> String {
        let i = &self.info;
        let mut s = format!("{} | {:?} | {:?}", i.name, i.backend, i.device_type);
        if !i.driver_info.is_empty() {
            s.push_str(&format!(" | {}", i.driver_info));
        }
        s
    }

    /// The adapter's description as wgpu reports it.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's, all requested).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// Whether the adapter is a CPU (software) implementation such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Fails with [`GpuError::DeviceLost`] or [`GpuError::Device`] if the
    /// device was lost or wgpu reported an error since the last check.
    pub fn check(&self) -> GpuResult<()> {
        let mut st = self
            .status
            .lock()
            .map_err(|_| GpuError::Device("status lock poisoned".into()))?;
        if let Some(m) = &st.lost {
            return Err(GpuError::DeviceLost(m.clone()));
        }
        if let Some(m) = st.error.take() {
            return Err(GpuError::Device(m));
        }
        Ok(())
    }

    /// Checks that a buffer of `len` 32-bit elements fits the device's limits.
    pub fn check_buffer_len(&self, what: &str, len: usize) -> GpuResult<()> {
        let bytes = (len.max(1) as u64).saturating_mul(4);
        let binding = self.limits.max_storage_buffer_binding_size;
        let limit = binding.min(self.limits.max_buffer_size);
        if bytes > limit {
            return Err(GpuError::LimitExceeded {
                what: format!("storage buffer '{what}' ({len} f32 elements, bytes)"),
                requested: bytes,
                limit,
                hint: "use fewer tokens per batch (--batch / --context) or a smaller width",
            });
        }
        Ok(())
    }

    /// A zero-filled storage buffer of `len` 32-bit elements.
    pub fn zeros(&self, what: &str, len: usize) -> GpuResult<GpuBuffer> {
        self.check_buffer_len(what, len)?;
        self.check()?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: (len.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(GpuBuffer { buffer, len })
    }

    /// A storage buffer holding `data` (f32 or u32).
    pub fn upload<T: Pod>(&self, what: &str, data: &[T]) -> GpuResult<GpuBuffer> {
        debug_assert_eq!(size_of::<T>(), 4);
        let buf = self.zeros(what, data.len())?;
        self.write(&buf, 0, data)?;
        Ok(buf)
    }

    /// Writes `data` at element `offset` of `buf`, after every dispatch recorded so far.
    pub fn write<T: Pod>(&self, buf: &GpuBuffer, offset: usize, data: &[T]) -> GpuResult<()> {
        if offset + data.len() > buf.len {
            return Err(GpuError::Shape {
                what: "write into a GPU buffer",
                expected: buf.len - offset.min(buf.len),
                got: data.len(),
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        self.flush()?;
        self.queue
            .write_buffer(&buf.buffer, (offset * 4) as u64, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Copies `len` elements from `src[src_offset..]` to `dst[dst_offset..]` (recorded in order).
    pub fn copy(
        &self,
        src: &GpuBuffer,
        src_offset: usize,
        dst: &GpuBuffer,
        dst_offset: usize,
        len: usize,
    ) -> GpuResult<()> {
        if src_offset + len > src.len || dst_offset + len > dst.len {
            return Err(GpuError::Shape {
                what: "copy between GPU buffers",
                expected: (src.len - src_offset.min(src.len))
                    .min(dst.len - dst_offset.min(dst.len)),
                got: len,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let mut rec = self.lock()?;
        let enc = self.encoder(&mut rec);
        enc.copy_buffer_to_buffer(
            &src.buffer,
            (src_offset * 4) as u64,
            &dst.buffer,
            (dst_offset * 4) as u64,
            (len * 4) as u64,
        );
        Ok(())
    }

    /// Sets every element of `buf` to zero (recorded in order).
    pub fn clear(&self, buf: &GpuBuffer) -> GpuResult<()> {
        let mut rec = self.lock()?;
        let enc = self.encoder(&mut rec);
        enc.clear_buffer(&buf.buffer, 0, None);
        Ok(())
    }

    fn lock(&self) -> GpuResult<std::sync::MutexGuard<'_, Recorder>> {
        self.recorder
            .lock()
            .map_err(|_| GpuError::Device("recorder lock poisoned".into()))
    }

    fn encoder<'r>(&self, rec: &'r mut Recorder) -> &'r mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("mhc") })
        })
    }

    /// Submits everything recorded so far (no wait).
    pub fn flush(&self) -> GpuResult<()> {
        let mut rec = self.lock()?;
        self.flush_locked(&mut rec);
        Ok(())
    }

    fn flush_locked(&self, rec: &mut Recorder) {
        if let Some(enc) = rec.encoder.take() {
            if !rec.params.is_empty() {
                self.queue.write_buffer(&self.param_buffer, 0, &rec.params);
                rec.params.clear();
            }
            self.queue.submit(Some(enc.finish()));
        }
    }

    /// Workgroup counts `(x, y)` covering `count` workgroups with `x` at most
    /// the device's per-dimension limit (shaders linearise `x + y·X`).
    pub(crate) fn groups(&self, what: &str, count: usize) -> GpuResult<(u32, u32)> {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1) as usize;
        let count = count.max(1);
        let x = count.min(max);
        let y = count.div_ceil(x);
        if y > max {
            return Err(GpuError::LimitExceeded {
                what: format!("workgroups of '{what}'"),
                requested: count as u64,
                limit: (max * max) as u64,
                hint: "use fewer tokens per batch",
            });
        }
        Ok((x as u32, y as u32))
    }

    /// Records one dispatch of `kernel` over `groups` workgroups with `buffers`
    /// bound in order to `@group(0)` and `params` to `@group(1)`.
    pub(crate) fn dispatch(
        &self,
        kernel: &Kernel,
        buffers: &[&GpuBuffer],
        params: Params,
        groups: (u32, u32),
    ) -> GpuResult<()> {
        debug_assert_eq!(buffers.len(), kernel.access.len(), "{}", kernel.entry);
        let mut rec = self.lock()?;
        if rec.params.len() as u64 >= PARAM_STRIDE * PARAM_SLOTS {
            self.flush_locked(&mut rec);
        }
        let pipeline = self.pipeline(&mut rec, kernel)?;
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.buffer.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry),
            layout: &layout,
            entries: &entries,
        });
        let offset = rec.params.len() as u32;
        rec.params.extend_from_slice(bytemuck::bytes_of(&params));
        rec.params
            .resize(offset as usize + PARAM_STRIDE as usize, 0);
        let enc = self.encoder(&mut rec);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.set_bind_group(1, &self.param_group, &[offset]);
            pass.dispatch_workgroups(groups.0, groups.1, 1);
        }
        Ok(())
    }

    fn pipeline(&self, rec: &mut Recorder, kernel: &Kernel) -> GpuResult<wgpu::ComputePipeline> {
        if let Some((p, access)) = rec.pipelines.get(&(kernel.module, kernel.entry)) {
            debug_assert_eq!(*access, kernel.access);
            return Ok(p.clone());
        }
        let module = rec
            .modules
            .entry(kernel.module)
            .or_insert_with(|| {
                let body = match kernel.module {
                    Module::Wrapper => WRAPPER_WGSL,
                    Module::Model => MODEL_WGSL,
                };
                self.device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(match kernel.module {
                            Module::Wrapper => "wrapper.wgsl",
                            Module::Model => "model.wgsl",
                        }),
                        source: wgpu::ShaderSource::Wgsl(format!("{COMMON_WGSL}\n{body}").into()),
                    })
            })
            .clone();
        let storage = rec
            .layouts
            .entry(kernel.access)
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
                    .access
                    .bytes()
                    .enumerate()
                    .map(|(i, a)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage {
                                read_only: a == b'r',
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(kernel.access),
                        entries: &entries,
                    })
            })
            .clone();
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(kernel.entry),
                bind_group_layouts: &[Some(&storage), Some(&self.param_layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: Default::default(),
                cache: None,
            });
        rec.pipelines.insert(
            (kernel.module, kernel.entry),
            (pipeline.clone(), kernel.access),
        );
        Ok(pipeline)
    }

    /// Reads `len` elements from element `offset` of `buf` back to the host,
    /// after every dispatch recorded so far. Works in browsers too.
    pub async fn read<T: Pod>(
        &self,
        buf: &GpuBuffer,
        offset: usize,
        len: usize,
    ) -> GpuResult<Vec<T>> {
        let mut out = self.read_many(&[(buf, offset, len)]).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Reads several ranges `(buffer, offset, len)` back with one staging
    /// buffer and one map, after every dispatch recorded so far: one round
    /// trip to the GPU however many ranges (in a browser each map is a trip
    /// through the event loop). Returns one vector per range, in order.
    pub async fn read_many<T: Pod>(
        &self,
        ranges: &[(&GpuBuffer, usize, usize)],
    ) -> GpuResult<Vec<Vec<T>>> {
        debug_assert_eq!(size_of::<T>(), 4);
        for &(buf, offset, len) in ranges {
            if offset + len > buf.len {
                return Err(GpuError::Shape {
                    what: "readback of a GPU buffer",
                    expected: buf.len - offset.min(buf.len),
                    got: len,
                });
            }
        }
        self.check()?;
        let total: usize = ranges.iter().map(|r| r.2).sum();
        if total == 0 {
            return Ok(ranges.iter().map(|_| Vec::new()).collect());
        }
        let bytes = (total * 4) as u64;
        if bytes > self.limits.max_buffer_size {
            return Err(GpuError::LimitExceeded {
                what: format!(
                    "readback of {} ranges ({total} elements, bytes)",
                    ranges.len()
                ),
                requested: bytes,
                limit: self.limits.max_buffer_size,
                hint: "read fewer tensors at a time",
            });
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mhc readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut rec = self.lock()?;
            let enc = self.encoder(&mut rec);
            let mut at = 0u64;
            for &(buf, offset, len) in ranges {
                if len > 0 {
                    let n = (len * 4) as u64;
                    enc.copy_buffer_to_buffer(&buf.buffer, (offset * 4) as u64, &staging, at, n);
                    at += n;
                }
            }
            self.flush_locked(&mut rec);
        }
        let (tx, rx) = oneshot();
        staging.map_async(wgpu::MapMode::Read, .., move |r| tx.send(r));
        // Native: drive the device until the map completes. In a browser the
        // event loop does, and a blocking poll is impossible.
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| match e {
                wgpu::PollError::Timeout => GpuError::DeviceLost(format!("poll: {e}")),
                _ => GpuError::Readback(e.to_string()),
            })?;
        let mapped = rx.await;
        self.check()?;
        mapped.map_err(|e| GpuError::Readback(e.to_string()))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            let all = bytemuck::cast_slice::<u8, T>(&view);
            let mut at = 0;
            ranges
                .iter()
                .map(|r| {
                    let v = all[at..at + r.2].to_vec();
                    at += r.2;
                    v
                })
                .collect()
        };
        staging.unmap();
        Ok(out)
    }

    /// Reads a whole f32 buffer back.
    pub async fn read_f32(&self, buf: &GpuBuffer) -> GpuResult<Vec<f32>> {
        self.read(buf, 0, buf.len).await
    }

    /// [`Self::read_f32`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32_blocking(&self, buf: &GpuBuffer) -> GpuResult<Vec<f32>> {
        pollster::block_on(self.read_f32(buf))
    }

    /// Waits until every submitted dispatch has finished (for timing).
    pub async fn finish(&self) -> GpuResult<()> {
        self.flush()?;
        let (tx, rx) = oneshot();
        self.queue.on_submitted_work_done(move || tx.send(()));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        rx.await;
        self.check()
    }

    /// [`Self::finish`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn finish_blocking(&self) -> GpuResult<()> {
        pollster::block_on(self.finish())
    }
}

/// A single-value channel: the sender is moved into a wgpu callback, the
/// receiver is awaited (no executor-specific types, so it works in browsers).
struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

struct Sender<T>(Arc<Mutex<Slot<T>>>);
struct Receiver<T>(Arc<Mutex<Slot<T>>>);

fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
    }));
    (Sender(slot.clone()), Receiver(slot))
}

impl<T> Sender<T> {
    fn send(self, value: T) {
        let waker = match self.0.lock() {
            Ok(mut s) => {
                s.value = Some(value);
                s.waker.take()
            }
            Err(_) => None,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<T> {
        // A poisoned lock only means a callback panicked; the slot is still usable.
        let mut s = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
