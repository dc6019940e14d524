using System.Net;
using System.Net.Sockets;

namespace LoraDeploy.Tests;

/// <summary>
/// A loopback TCP proxy that forwards to <c>upstream</c> until <see cref="StallAfter"/> bytes went up, then holds
/// every further byte towards upstream: a request body that never finishes, as when the sender dies mid-upload.
/// </summary>
public sealed class StallingProxy : IAsyncDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Uri _upstream;
    private readonly CancellationTokenSource _stop = new();
    private readonly List<TcpClient> _connections = [];
    private readonly Task _accepting;
    private long _up;

    public StallingProxy(Uri upstream)
    {
        _upstream = upstream;
        _listener.Start();
        Url = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
        _accepting = AcceptAsync();
    }

    public Uri Url { get; }

    /// <summary>Bytes sent upstream after which the proxy holds the rest; long.MaxValue = pass everything.</summary>
    public long StallAfter { get; set; } = long.MaxValue;

    public long BytesUp => Interlocked.Read(ref _up);

    public bool Stalled => BytesUp >= StallAfter;

    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                var server = new TcpClient();
                await server.ConnectAsync(_upstream.Host, _upstream.Port, _stop.Token);
                lock (_connections)
                {
                    _connections.Add(client);
                    _connections.Add(server);
                }
                _ = PumpAsync(client.GetStream(), server.GetStream(), up: true);
                _ = PumpAsync(server.GetStream(), client.GetStream(), up: false);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
        {
        }
    }

    private async Task PumpAsync(Stream from, Stream to, bool up)
    {
        var buffer = new byte[64 * 1024];
        try
        {
            int n;
            while ((n = await from.ReadAsync(buffer, _stop.Token)) > 0)
            {
                var allowed = n;
                if (up)
                {
                    var room = StallAfter - BytesUp;
                    allowed = (int)Math.Clamp(room, 0, n);
                }
                if (allowed > 0)
                {
                    await to.WriteAsync(buffer.AsMemory(0, allowed), _stop.Token);
                    if (up)
                    {
                        Interlocked.Add(ref _up, allowed);
                    }
                }
                if (allowed < n)
                {
                    await Task.Delay(Timeout.Infinite, _stop.Token); // held: the rest never arrives
                }
            }
            to.Close();
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
        {
            to.Close();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Stop();
        lock (_connections)
        {
            foreach (var connection in _connections)
            {
                connection.Dispose();
            }
        }
        await _accepting;
        _stop.Dispose();
    }
}
