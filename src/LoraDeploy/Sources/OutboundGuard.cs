using System.Net;
using System.Net.Sockets;
using System.Runtime.ExceptionServices;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Sources;

/// <summary>An outbound connection or redirect was refused by policy (SSRF guard); retrying will not help.</summary>
public sealed class OutboundRequestRefusedException(string message) : Exception(message)
{
    /// <summary>The host name (or literal address) that was refused, when an address was the reason.</summary>
    public string? Host { get; private init; }
    public IPAddress? Address { get; private init; }
    /// <summary>Why the address is refused, e.g. "loopback" or "private".</summary>
    public string? Category { get; private init; }
    /// <summary>The refused address was a redirect's target, not the URL this service was configured with.</summary>
    public bool ViaRedirect { get; private init; }

    // States the fact only: the fix is never to widen the guard for an address someone else chose (a redirect).
    public static OutboundRequestRefusedException ForAddress(string host, IPAddress address, string category) =>
        new(host == address.ToString()
            ? $"refused to connect to {address} ({category} address)"
            : $"refused to connect to {host} at {address} ({category} address)")
        {
            Host = host,
            Address = address,
            Category = category,
        };

    /// <summary>The same refusal, worded for a redirect target that CivitAI (or its storage) sent us to.</summary>
    internal OutboundRequestRefusedException ForRedirect() => Address is null
        ? new OutboundRequestRefusedException($"redirect refused: {Message}") { ViaRedirect = true }
        : new OutboundRequestRefusedException(Host == Address.ToString()
            ? $"redirect to {Address} refused: {Category} address is not CivitAI"
            : $"redirect to {Host} refused: it resolves to {Address}, a {Category} address, which is not CivitAI")
        {
            Host = Host,
            Address = Address,
            Category = Category,
            ViaRedirect = true,
        };
}

/// <summary>Classifies addresses that must not be reached from a server fetching user-supplied URLs.</summary>
public static class AddressPolicy
{
    /// <summary>Returns why <paramref name="address"/> is not public (e.g. "loopback"), or null for a public address.</summary>
    public static string? Classify(IPAddress address)
    {
        if (address.IsIPv4MappedToIPv6)
        {
            return Classify(address.MapToIPv4()) is { } c ? $"IPv4-mapped {c}" : null;
        }
        return address.AddressFamily switch
        {
            AddressFamily.InterNetwork => ClassifyV4(address.GetAddressBytes()),
            AddressFamily.InterNetworkV6 => ClassifyV6(address.GetAddressBytes()),
            _ => "not an IP address",
        };
    }

    /// <summary>The IPv4 address embedded in an IPv6 mapped/compatible/6to4/NAT64 form, if any.</summary>
    public static IPAddress? EmbeddedIPv4(IPAddress address)
    {
        if (address.AddressFamily != AddressFamily.InterNetworkV6)
        {
            return null;
        }
        if (address.IsIPv4MappedToIPv6)
        {
            return address.MapToIPv4();
        }
        var b = address.GetAddressBytes();
        if (b.AsSpan(0, 12).IndexOfAnyExcept((byte)0) < 0 && !(b[12] == 0 && b[13] == 0 && b[14] == 0 && b[15] <= 1))
        {
            return new IPAddress(b.AsSpan(12, 4)); // IPv4-compatible ::a.b.c.d (deprecated)
        }
        if (b[0] == 0x20 && b[1] == 0x02)
        {
            return new IPAddress(b.AsSpan(2, 4)); // 6to4 2002:AABB:CCDD::/48
        }
        if (b[0] == 0x00 && b[1] == 0x64 && b[2] == 0xff && b[3] == 0x9b
            && (b.AsSpan(4, 8).IndexOfAnyExcept((byte)0) < 0 || (b[4] == 0 && b[5] == 1)))
        {
            return new IPAddress(b.AsSpan(12, 4)); // NAT64 64:ff9b::/96 and local-use 64:ff9b:1::/48
        }
        return null;
    }

    /// <summary>Null when the address may be contacted; otherwise the category that refused it.</summary>
    public static string? Check(IPAddress address, IReadOnlyList<IPNetwork> allowed)
    {
        var category = Classify(address);
        if (category is null)
        {
            return null;
        }
        var embedded = EmbeddedIPv4(address);
        foreach (var range in allowed)
        {
            if (range.Contains(address) || (embedded is not null && range.Contains(embedded)))
            {
                return null;
            }
        }
        return category;
    }

    private static string? ClassifyV4(byte[] b) => b switch
    {
        [0, ..] => "unspecified",
        [127, ..] => "loopback",
        [10, ..] => "private",
        [172, >= 16 and <= 31, ..] => "private",
        [192, 168, ..] => "private",
        [169, 254, ..] => "link-local",
        [100, >= 64 and <= 127, ..] => "carrier-grade NAT",
        [255, 255, 255, 255] => "broadcast",
        [>= 224 and <= 239, ..] => "multicast",
        [>= 240, ..] => "reserved",
        [192, 0, 0, _] => "reserved",
        [198, 18 or 19, ..] => "reserved",
        _ => null,
    };

    private static string? ClassifyV6(byte[] b)
    {
        if (b.AsSpan(0, 15).IndexOfAnyExcept((byte)0) < 0 && b[15] <= 1)
        {
            return b[15] == 0 ? "unspecified" : "loopback";
        }
        if (b[0] == 0xff)
        {
            return "multicast";
        }
        if ((b[0] & 0xfe) == 0xfc)
        {
            return "unique local";
        }
        if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
        {
            return "link-local";
        }
        if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0)
        {
            return "site-local";
        }
        if (EmbeddedIPv4(new IPAddress(b)) is { } v4)
        {
            var form = b[0] == 0x20 ? "6to4" : b[0] == 0 && b[1] == 0x64 ? "NAT64" : "IPv4-compatible";
            return ClassifyV4(v4.GetAddressBytes()) is { } c ? $"{form} {c}" : null;
        }
        return null;
    }
}

/// <summary>
/// The <see cref="SocketsHttpHandler.ConnectCallback"/> that resolves the host itself and only connects to
/// addresses the policy allows, so a DNS answer or redirect cannot steer us into the private network.
/// </summary>
internal sealed class OutboundConnectGuard(IOptionsMonitor<NetworkOptions> network)
{
    public async ValueTask<Stream> ConnectAsync(SocketsHttpConnectionContext context, CancellationToken cancellationToken)
    {
        var host = context.DnsEndPoint.Host;
        var port = context.DnsEndPoint.Port;
        IPAddress[] candidates = IPAddress.TryParse(host.Trim('[', ']'), out var literal)
            ? [literal]
            : await Dns.GetHostAddressesAsync(host, cancellationToken).ConfigureAwait(false);
        var allowed = network.CurrentValue.ParsedRanges();

        OutboundRequestRefusedException? refusal = null;
        ExceptionDispatchInfo? lastError = null;
        foreach (var address in candidates)
        {
            if (AddressPolicy.Check(address, allowed) is { } category)
            {
                refusal ??= OutboundRequestRefusedException.ForAddress(host, address, category);
                continue;
            }

            var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                await socket.ConnectAsync(new IPEndPoint(address, port), cancellationToken).ConfigureAwait(false);
                // Check the peer we actually reached, not just the one we asked for.
                if (socket.RemoteEndPoint is IPEndPoint peer && AddressPolicy.Check(peer.Address, allowed) is { } peerCategory)
                {
                    socket.Dispose();
                    throw OutboundRequestRefusedException.ForAddress(host, peer.Address, peerCategory);
                }
                return new NetworkStream(socket, ownsSocket: true);
            }
            catch (SocketException ex)
            {
                socket.Dispose();
                lastError = ExceptionDispatchInfo.Capture(ex);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }

        // An allowed address that failed to connect is the more useful error; otherwise name the refusal.
        lastError?.Throw();
        throw refusal ?? new OutboundRequestRefusedException($"{host} resolved to no addresses");
    }
}
