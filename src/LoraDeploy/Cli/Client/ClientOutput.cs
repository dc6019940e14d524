using Spectre.Console;

namespace LoraDeploy.Cli.Client;

/// <summary>
/// Where client commands write. Rich (colours, live progress) on a terminal; plain lines without ANSI
/// escapes when stdout is redirected, so scripts and tests read clean text.
/// </summary>
internal sealed class ClientOutput
{
    public ClientOutput(TextWriter stdout, TextWriter stderr, bool interactive)
    {
        Interactive = interactive;
        Error = stderr;
        Out = stdout;
        Console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = interactive ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = interactive ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
            Interactive = interactive ? InteractionSupport.Detect : InteractionSupport.No,
            Out = new AnsiConsoleOutput(stdout),
        });
        if (!interactive)
        {
            Console.Profile.Width = 200;
        }
    }

    /// <summary>
    /// Columns a line may use: the terminal's width, or <c>COLUMNS</c> when stdout is not a terminal (null then
    /// when unset: lines are not cut for scripts and files).
    /// </summary>
    public int? Width => Interactive
        ? Console.Profile.Width
        : int.TryParse(Environment.GetEnvironmentVariable("COLUMNS"), out var columns) && columns > 0 ? columns : null;

    /// <summary>True when stdout is a terminal: live progress and colours are used.</summary>
    public bool Interactive { get; }

    public IAnsiConsole Console { get; }

    public TextWriter Out { get; }

    public TextWriter Error { get; }

    public static ClientOutput ForProcess() =>
        new(System.Console.Out, System.Console.Error,
            !System.Console.IsOutputRedirected && Environment.GetEnvironmentVariable("TERM") != "dumb");

    /// <summary>Writes a plain line (markup-free) to stdout.</summary>
    public void Line(string text)
    {
        if (Interactive)
        {
            Console.WriteLine(text);
        }
        else
        {
            Out.WriteLine(text);
        }
    }

    /// <summary>Writes markup on a terminal, or the same text without markup elsewhere.</summary>
    public void Markup(string markup)
    {
        if (Interactive)
        {
            Console.MarkupLine(markup);
        }
        else
        {
            Out.WriteLine(Spectre.Console.Markup.Remove(markup));
        }
    }

    public void Fail(string message) => Error.WriteLine($"error: {message}");
}
