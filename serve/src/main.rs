//! vl-serve: parses the arguments, binds, prints the address, serves.
use std::process::ExitCode;

use clap::Parser;
use vl_serve::{Args, Server};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    vl_runtime::exit::exit_code(serve(&args).await)
}

async fn serve(args: &Args) -> Result<(), vl_serve::ServeError> {
    let server = Server::bind(args).await?;
    println!("listening on http://{}", server.local_addr());
    server.run().await
}
