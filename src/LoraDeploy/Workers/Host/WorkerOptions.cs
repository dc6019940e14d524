using System.Text.RegularExpressions;
using LoraDeploy.Auth;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers.Host;

/// <summary>Settings section <c>Worker</c> (the <c>loradeploy worker</c> flags land here too).</summary>
public sealed partial class WorkerOptions
{
    public const string Section = "Worker";
    public const long DefaultCacheBytes = 20L * 1024 * 1024 * 1024;

    /// <summary>The server's base URL (<c>--server</c>).</summary>
    public string? Server { get; set; }

    /// <summary>The worker token, <c>ldw_…</c> (<c>--token</c>).</summary>
    public string? Token { get; set; }

    /// <summary>Registration id; unset = a stable id kept in <c>{data-dir}/worker-id</c>.</summary>
    public string? Id { get; set; }

    /// <summary>Requests run at once; more wait in a queue (reported as queue depth).</summary>
    public int Slots { get; set; } = 4;

    /// <summary>Budget of the adapter blob cache; least recently used files beyond it are deleted (pinned ones kept).</summary>
    public long CacheBytes { get; set; } = DefaultCacheBytes;

    /// <summary>Folder of the blob cache; unset = <c>{data-dir}/worker-cache</c>.</summary>
    public string? CachePath { get; set; }

    /// <summary>The URL the server should call; unset = the address this worker listens on (set it behind NAT or in containers).</summary>
    public string? AdvertiseUrl { get; set; }

    /// <summary>Attempts to fetch one blob (each resumes where the last one stopped).</summary>
    public int FetchAttempts { get; set; } = 5;

    [GeneratedRegex(@"^[A-Za-z0-9._-]{1,64}\z")]
    internal static partial Regex IdPattern();

    internal static bool IsHttpUrl(string? value) =>
        Uri.TryCreate(value, UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https";

    internal sealed class Validation : IValidateOptions<WorkerOptions>
    {
        public ValidateOptionsResult Validate(string? name, WorkerOptions options)
        {
            var errors = new List<string>();
            if (!IsHttpUrl(options.Server))
            {
                errors.Add($"{Section}:Server '{options.Server}' is not an http(s) URL: give the LoraDeploy server's address with --server.");
            }
            if (!WorkerTokens.TryParse(options.Token, out _))
            {
                errors.Add($"{Section}:Token is not a worker token (ldw_…): create one with `loradeploy token create --worker NAME`.");
            }
            if (options.Id is not null && !IdPattern().IsMatch(options.Id))
            {
                errors.Add($"{Section}:Id '{options.Id}' must be 1-64 of letters, digits, '.', '_', '-'.");
            }
            if (options.Slots is < 1 or > WorkerProtocol.MaxSlots)
            {
                errors.Add($"{Section}:Slots {options.Slots} is not from 1 to {WorkerProtocol.MaxSlots}.");
            }
            if (options.CacheBytes < 1024 * 1024)
            {
                errors.Add($"{Section}:CacheBytes {options.CacheBytes} is below 1 MiB (1048576): adapters would not fit.");
            }
            if (options.AdvertiseUrl is not null && !IsHttpUrl(options.AdvertiseUrl))
            {
                errors.Add($"{Section}:AdvertiseUrl '{options.AdvertiseUrl}' is not an http(s) URL.");
            }
            if (options.FetchAttempts is < 1 or > 100)
            {
                errors.Add($"{Section}:FetchAttempts {options.FetchAttempts} is not from 1 to 100.");
            }
            return errors.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(errors);
        }
    }
}
