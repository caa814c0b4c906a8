//! Modbus TCP server for simulated devices ([`serve_tcp`]), built on the
//! tokio-modbus TCP server and dispatching by unit id.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::server::tcp::Server;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use super::device::{
    unit_map, Device, Op, Reply, EX_GATEWAY_TARGET, EX_ILLEGAL_FUNCTION, EX_SERVER_FAILURE,
};

type ReplyFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

/// tokio-modbus service answering for a set of devices.
#[derive(Debug)]
struct FloorService {
    devices: HashMap<u8, Device>,
}

fn to_op(req: &Request<'_>) -> Option<Op> {
    Some(match req {
        Request::ReadCoils(a, q) => Op::ReadCoils(*a, *q),
        Request::ReadDiscreteInputs(a, q) => Op::ReadDiscrete(*a, *q),
        Request::ReadHoldingRegisters(a, q) => Op::ReadHolding(*a, *q),
        Request::ReadInputRegisters(a, q) => Op::ReadInput(*a, *q),
        Request::WriteSingleCoil(a, v) => Op::WriteCoil(*a, *v),
        Request::WriteSingleRegister(a, v) => Op::WriteRegister(*a, *v),
        Request::WriteMultipleCoils(a, v) => Op::WriteCoils(*a, v.to_vec()),
        Request::WriteMultipleRegisters(a, v) => Op::WriteRegisters(*a, v.to_vec()),
        _ => return None,
    })
}

fn to_response(op: &Op, reply: Reply) -> Option<Response> {
    Some(match (op, reply) {
        (Op::ReadCoils(..), Reply::Bits(b)) => Response::ReadCoils(b),
        (Op::ReadDiscrete(..), Reply::Bits(b)) => Response::ReadDiscreteInputs(b),
        (Op::ReadInput(..), Reply::Words(w)) => Response::ReadInputRegisters(w),
        (Op::WriteCoil(..), Reply::Single(a, v)) => Response::WriteSingleCoil(a, v != 0),
        (Op::WriteRegister(..), Reply::Single(a, v)) => Response::WriteSingleRegister(a, v),
        (Op::WriteCoils(..), Reply::Multiple(a, q)) => Response::WriteMultipleCoils(a, q),
        (Op::WriteRegisters(..), Reply::Multiple(a, q)) => Response::WriteMultipleRegisters(a, q),
        (Op::ReadHolding(..), Reply::Words(w)) => Response::ReadHoldingRegisters(w),
        // `Device::execute` always returns the reply kind matching the op.
        _ => return None,
    })
}

impl Service for FloorService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = ReplyFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let Some(device) = self.devices.get(&req.slave) else {
            return Box::pin(async { Err(ExceptionCode::new(EX_GATEWAY_TARGET)) });
        };
        device.count_request();
        let faults = device.faults();
        if faults.silent {
            return Box::pin(async { Ok(None) });
        }
        let result = match (faults.exception, to_op(&req.request)) {
            (Some(code), _) => Err(code),
            (None, None) => Err(EX_ILLEGAL_FUNCTION),
            (None, Some(op)) => device
                .execute(&op)
                .and_then(|r| to_response(&op, r).ok_or(EX_SERVER_FAILURE)),
        };
        device.count_reply();
        let result = result.map(Some).map_err(ExceptionCode::new);
        let delay = faults.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            result
        })
    }
}

/// Serves `devices` over Modbus TCP on `listener` until `shutdown` is cancelled
/// (open connections are closed then too).
///
/// Requests are dispatched by the MBAP unit id. A unit id with no device gets
/// exception 0x0B (gateway target device failed to respond), as a real
/// TCP/RTU gateway answers; there is no broadcast on TCP. Faults `silent`,
/// `delay` and `exception` apply; the RTU-only byte faults are ignored.
/// Requests on one connection are answered in order, so a delayed device
/// holds up that connection (not others). The write is executed when the
/// request arrives, the reply is sent after `delay`.
pub async fn serve_tcp(
    listener: TcpListener,
    devices: Vec<Device>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let service = Arc::new(FloorService {
        devices: unit_map(devices),
    });
    let on_connected = move |stream: TcpStream, _addr: SocketAddr| {
        let service = Arc::clone(&service);
        async move { Ok(Some((service, stream))) }
    };
    let on_process_error = |err: io::Error| {
        tracing::debug!(error = %err, "simulated Modbus TCP connection ended");
    };
    Server::new(listener)
        .serve_until(&on_connected, on_process_error, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
